"""Contracts between the stages of one RL step: rollout -> rewards -> training.

Token alignment used everywhere: a sequence is ``prompt_ids + response_ids``; position ``t``
predicts token ``t + 1``. Per-token training quantities (log-probs, masks) are indexed by the
predicting position, so the log-prob of response token ``j`` sits at position
``len(prompt_ids) + j - 1``. Routed experts are indexed by the *input* position (the routes the
router chose while reading token ``t``), which is the same thing, since the token at position
``t`` is the one whose forward pass predicts ``t + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    """Weight version the engine reported for this sample."""
    routed_experts: np.ndarray | None = None
    """int32 ``[len(prompt_ids) + len(response_ids) - 1, moe_layers, top_k]``: experts chosen
    while reading each input token (R3); None unless requested."""
    response_text: str | None = None
    reward: float | None = None

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
class RolloutBatch:
    """All groups of one RL step."""

    groups: list[Group]
    weight_version: str | None = None

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]


@dataclass
class TrainBatch:
    """Padded tensors for the trainer; row ``i`` is sample ``i`` of the rollout batch.

    All tensors are ``[B, T]`` (``routes``: ``[B, T, moe_layers, top_k]``) on the same device;
    see the module docstring for the alignment of positions and tokens.
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
    routes: torch.Tensor | None = None
    """int32 experts to replay per input position (R2: recorded; R3: from the rollout)."""

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "TrainBatch":
        """The rows ``rows`` of every tensor (a minibatch or microbatch)."""

        def pick(t):
            return None if t is None else t[rows]

        return TrainBatch(
            tokens=self.tokens[rows], targets=self.targets[rows], loss_mask=self.loss_mask[rows],
            advantages=self.advantages[rows], rollout_logprobs=self.rollout_logprobs[rows],
            old_logprobs=pick(self.old_logprobs), routes=pick(self.routes))
