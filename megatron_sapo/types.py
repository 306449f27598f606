"""Contracts between the stages of one RL step: rollout -> rewards -> training.

Token alignment used everywhere: a sequence is ``prompt_ids + response_ids``; position ``t``
predicts token ``t + 1``. Per-token training quantities (log-probs, masks) are indexed by the
predicting position, so the log-prob of response token ``j`` sits at position
``len(prompt_ids) + j - 1``. Routed experts are indexed by the *input* position (the routes the
router chose while reading token ``t``), which is the same thing, since the token at position
``t`` is the one whose forward pass predicts ``t + 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass
class VisionInputs:
    """The images of one prompt as the model's processor prepared them for the vision encoder."""

    pixel_values: torch.Tensor
    """float ``[patches, channels * temporal_patch * patch * patch]``: every image's patches, image
    after image, in the order of the prompt's image placeholders."""
    image_grid_thw: torch.Tensor
    """int64 ``[images, 3]``: each image's (temporal, height, width) size in patches."""

    def __post_init__(self) -> None:
        grid = self.image_grid_thw
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
            raise ValueError(f"VisionInputs.image_grid_thw has shape {tuple(grid.shape)}, expected [images >= 1, 3]")
        if self.pixel_values.ndim != 2 or self.pixel_values.shape[0] != int(grid.prod(dim=1).sum()):
            raise ValueError(
                f"VisionInputs.pixel_values has shape {tuple(self.pixel_values.shape)}, expected "
                f"[{int(grid.prod(dim=1).sum())} patches (the sum of image_grid_thw's products), patch size]")

    @property
    def num_images(self) -> int:
        return self.image_grid_thw.shape[0]

    def image_tokens(self, spatial_merge_size: int) -> int:
        """Number of image tokens these images take in the prompt (patches merged in squares)."""
        return int(self.image_grid_thw.prod(dim=1).sum()) // spatial_merge_size**2

    @staticmethod
    def concat(parts: Sequence["VisionInputs | None"]) -> "VisionInputs | None":
        """The images of several prompts in order, as the model takes them for a batch (None:
        no images at all)."""
        present = [p for p in parts if p is not None]
        if not present:
            return None
        return VisionInputs(pixel_values=torch.cat([p.pixel_values for p in present]),
                            image_grid_thw=torch.cat([p.image_grid_thw for p in present]))


@dataclass
class Prompt:
    """One problem: what the model is asked and what a verifier checks the answer against."""

    index: int
    """Position in the dataset (stable across epochs; used for seeding and resume)."""
    prompt_ids: list[int]
    """Tokenised prompt, chat template applied."""
    answer: str | None = None
    """Reference answer for the reward function (None for reward functions that need none)."""
    text: str | None = None
    """The prompt as text, kept for logs."""
    images: list[bytes] | None = None
    """Encoded image files (PNG/JPEG) of a multimodal prompt, in the order of its image
    placeholders; ``prompt_ids`` already hold each image's expanded ``<|image_pad|>`` tokens."""
    vision: VisionInputs | None = None
    """The same images through the model's processor, for the trainer (None without images)."""
    fields: dict = field(default_factory=dict)
    """The row's other fields (neither prompt, answer nor images), for the reward function."""


@dataclass
class Sample:
    """One response sampled by the rollout engine."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    """Behaviour-policy log-prob of each response token, as the rollout engine computed it."""
    finish_reason: str
    """"stop" (EOS or stop string), "length" (max_new_tokens) or "abort"."""
    weight_version: str | None = None
    """Weight version the engine reported for this sample (the oldest, if a weight sync came
    while it was sampled)."""
    token_versions: list[tuple[int, str | None]] | None = None
    """(first response token, weight version) of each run of tokens sampled under one version
    when a weight sync came in the middle of the response (``rollout.partial = "continue"``);
    None: every token under ``weight_version``."""
    routed_experts: np.ndarray | None = None
    """int32 ``[len(prompt_ids) + len(response_ids) - 1, moe_layers, top_k]``: experts chosen
    while reading each input token (R3); None unless requested."""
    response_text: str | None = None
    reward: float | None = None
    in_loss: bool = True
    """False: the sample only fills the batch (a group dynamic sampling could not replace)."""

    def __post_init__(self) -> None:
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"sample has {len(self.response_ids)} response tokens but {len(self.rollout_logprobs)} log-probs")
        if self.routed_experts is not None:
            expected = len(self.prompt_ids) + len(self.response_ids) - 1
            if self.routed_experts.ndim != 3 or self.routed_experts.shape[0] != expected:
                raise ValueError(
                    f"routed_experts has shape {tuple(self.routed_experts.shape)}, expected "
                    f"[{expected}, moe_layers, top_k] (prompt + response - 1 tokens)")

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class Group:
    """The G responses sampled for one prompt; advantages are normalised within it."""

    prompt: Prompt
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        missing = [i for i, s in enumerate(self.samples) if s.reward is None]
        if missing:
            raise ValueError(f"group of prompt {self.prompt.index}: samples {missing} have no reward yet")
        return [float(s.reward) for s in self.samples]


@dataclass
class TrainBatch:
    """Padded tensors for the trainer; row ``i`` is sample ``i`` of the rows this rank trains.

    All tensors are ``[B, T]`` (``position_ids``: ``[3, B, T]``) on one device, ``T`` the
    longest row; see the module docstring for the alignment of positions and tokens. Routes are
    kept per row for its real tokens only, in a small integer type and on the CPU: they are the
    largest per-token data of a step, and a microbatch moves its own rows' routes to the device
    when it runs (``training/microbatch.py``). Vision-language models also get each row's images
    (``vision``) and multimodal RoPE positions; text models leave both None.
    """

    tokens: torch.Tensor
    """int64 input tokens, right-padded."""
    targets: torch.Tensor
    """int64 next tokens (``tokens`` shifted left by one; padding where no target)."""
    loss_mask: torch.Tensor
    """float 1.0 where the target is a response token, else 0.0."""
    advantages: torch.Tensor
    """float ``[B]`` per-sequence advantage."""
    rollout_logprobs: torch.Tensor
    """float rollout-engine log-prob of each target (0 where masked)."""
    old_logprobs: torch.Tensor | None = None
    """float log-prob of each target under the trainer's policy before the update."""
    token_weights: torch.Tensor | None = None
    """float rollout-correction weight of each target (``algo/correction.py``); None: 1."""
    routes: list[torch.Tensor] | None = None
    """Per row, the experts to replay at each input position but the last: ``[length - 1,
    moe_layers, top_k]`` in ``route_dtype`` (R2: recorded; R3: from the rollout), on the CPU."""
    position_ids: torch.Tensor | None = None
    """int64 ``[3, B, T]`` multimodal RoPE positions (temporal, height, width); None: ``0..T-1``."""
    vision: list[VisionInputs | None] | None = None
    """Per row, the images of the row's prompt (None for a text-only row); samples of one prompt
    share one object. None for text models."""
    lengths: torch.Tensor | None = None
    """int64 ``[B]`` real tokens of each row (prompt + response), on the CPU (microbatch planning
    reads it without waiting for the device); None: every row is ``T`` long."""

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_lengths(self) -> list[int]:
        """Real tokens of each row."""
        if self.lengths is None:
            return [self.tokens.shape[1]] * self.batch_size
        return self.lengths.tolist()

    def to(self, device: torch.device | str) -> "TrainBatch":
        """The batch with its tensors on ``device`` (row lengths, routes and images stay on the
        CPU: a microbatch moves its own when it runs)."""

        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return dataclasses.replace(
            self, tokens=move(self.tokens), targets=move(self.targets), loss_mask=move(self.loss_mask),
            advantages=move(self.advantages), rollout_logprobs=move(self.rollout_logprobs),
            old_logprobs=move(self.old_logprobs), token_weights=move(self.token_weights),
            position_ids=move(self.position_ids))

    @property
    def vision_inputs(self) -> VisionInputs | None:
        """All rows' images in row order, as the model takes them (None: no row has images)."""
        return None if self.vision is None else VisionInputs.concat(self.vision)

    def select(self, rows: slice | torch.Tensor) -> "TrainBatch":
        """The rows ``rows`` of every tensor (a minibatch or microbatch), with their images."""

        def pick(t):
            return None if t is None else t[rows]

        return TrainBatch(
            tokens=self.tokens[rows], targets=self.targets[rows], loss_mask=self.loss_mask[rows],
            advantages=self.advantages[rows], rollout_logprobs=self.rollout_logprobs[rows],
            old_logprobs=pick(self.old_logprobs), token_weights=pick(self.token_weights),
            routes=None if self.routes is None else _pick_rows(self.routes, rows),
            position_ids=None if self.position_ids is None else self.position_ids[:, rows],
            vision=None if self.vision is None else _pick_rows(self.vision, rows),
            lengths=None if self.lengths is None else self.lengths[rows.cpu() if torch.is_tensor(rows) else rows])

    def trimmed(self, length: int) -> "TrainBatch":
        """The first ``length`` positions of every ``[B, T]`` tensor (rows no longer than that)."""

        def cut(t):
            return None if t is None else t[..., :length]

        return dataclasses.replace(
            self, tokens=cut(self.tokens), targets=cut(self.targets), loss_mask=cut(self.loss_mask),
            rollout_logprobs=cut(self.rollout_logprobs), old_logprobs=cut(self.old_logprobs),
            token_weights=cut(self.token_weights), position_ids=cut(self.position_ids))


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds expert ids ``0..num_experts - 1``."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def _pick_rows(items: list, rows: slice | torch.Tensor) -> list:
    """``items[rows]`` for a slice, an index tensor or a boolean mask, as tensor indexing does."""
    if isinstance(rows, slice):
        return items[rows]
    index = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.flatten()
    return [items[i] for i in index.tolist()]
