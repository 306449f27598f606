"""Rollout samples -> the padded :class:`~megatron_sapo.types.TrainBatch` the trainer consumes.

For a vision-language model the batch also carries each row's images (the prompt's processor
output) and the multimodal RoPE positions of every token, computed once here rather than in
every forward pass.

An image token the policy *generates* is not an image: the rollout engine embeds it as the plain
token it is and places it as text, while the trainer's model would take every image token as a
slot for an image and find more slots than images. Such a token is therefore replaced by the
padding token in the trainer's inputs, and the loss stops at it (the log-prob *of* that token
is still trained; those of the tokens after it would be computed from a different input than
the rollout engine saw). Random tiny models sample it now and then; trained ones hardly ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_sapo.types import Sample, TrainBatch, VisionInputs, route_dtype


@dataclass(frozen=True)
class ImageLayout:
    """How a vision-language model lays images out in the token sequence."""

    image_token_id: int
    """The token standing for one merged group of patches (``<|image_pad|>``)."""
    spatial_merge_size: int
    """Patches merged per side into one image token (2 in Qwen3-VL)."""


def image_layout(spec) -> ImageLayout | None:
    """The image layout of a model spec (``models.<family>.from_hf_config``); None for a text
    model, whose spec has no vision part."""
    vision = getattr(spec, "vision", None)
    return None if vision is None else ImageLayout(spec.image_token_id, vision.spatial_merge_size)


def build_train_batch(samples: Sequence[Sample], advantages: Sequence[float], pad_id: int, *,
                      with_routes: bool = False, num_experts: int | None = None,
                      vision: Sequence[VisionInputs | None] | None = None,
                      layout: ImageLayout | None = None) -> TrainBatch:
    """Right-pad every ``prompt + response`` to the longest; the loss covers response tokens.

    ``with_routes``: also carry the routed experts the rollout engine returned (R3), per row for
    its real tokens only, in the smallest integer type that holds ``num_experts`` ids.
    ``layout``: the model is a vision-language model; ``vision[i]`` holds the images of sample
    ``i``'s prompt (None: none), and the batch gets multimodal positions."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if with_routes and num_experts is None:
        raise ValueError("build_train_batch: with_routes needs num_experts")
    length = max(len(s.tokens) for s in samples)
    rows = len(samples)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    targets = torch.full((rows, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, length)
    rollout_logprobs = torch.zeros(rows, length)
    routes = [] if with_routes else None
    for i, sample in enumerate(samples):
        ids = torch.tensor(sample.tokens)
        n, first = len(ids), len(sample.prompt_ids) - 1
        tokens[i, :n] = ids
        targets[i, :n - 1] = ids[1:]
        loss_mask[i, first:n - 1] = 1.0
        rollout_logprobs[i, first:n - 1] = torch.tensor(sample.rollout_logprobs)
        if with_routes:
            if sample.routed_experts is None:
                raise ValueError(f"sample {i} has no routed experts (R3 needs the rollout to return them)")
            routes.append(compact_routes(sample.routed_experts, num_experts))
    batch = TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask,
                       advantages=torch.tensor(list(advantages), dtype=torch.float32),
                       rollout_logprobs=rollout_logprobs, routes=routes,
                       lengths=torch.tensor([len(s.tokens) for s in samples], dtype=torch.long))
    if layout is not None:
        _add_vision(batch, samples, vision if vision is not None else [None] * rows, layout, pad_id)
    elif vision is not None and any(v is not None for v in vision):
        raise ValueError("samples carry images but no ImageLayout was given (is the model a vision-language one?)")
    return batch


def compact_routes(routes: np.ndarray | torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes ``[tokens, layers, top_k]`` as a tensor of the smallest integer type that holds
    ids ``0..num_experts - 1`` (``route_dtype``)."""
    routes = torch.as_tensor(np.asarray(routes)) if not torch.is_tensor(routes) else routes
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= num_experts):
        raise ValueError(f"routes hold expert ids {int(routes.min())}..{int(routes.max())}, outside "
                         f"0..{num_experts - 1}")
    return routes.to(route_dtype(num_experts))


def _add_vision(batch: TrainBatch, samples: Sequence[Sample], vision: Sequence[VisionInputs | None],
                layout: ImageLayout, pad_id: int) -> None:
    """Check each prompt's image tokens against its images, neutralise generated image tokens,
    and add the rows' images and multimodal positions."""
    from megatron_sapo.models.qwen3_vl import mrope_position_ids

    if len(vision) != len(samples):
        raise ValueError(f"{len(samples)} samples but vision inputs for {len(vision)}")
    for i, (sample, images) in enumerate(zip(samples, vision)):
        found = sample.prompt_ids.count(layout.image_token_id)
        expected = 0 if images is None else images.image_tokens(layout.spatial_merge_size)
        if found != expected:
            raise ValueError(f"sample {i}: its prompt has {found} image tokens but its images make {expected} "
                             f"(image_grid_thw {None if images is None else images.image_grid_thw.tolist()})")
        first = len(sample.prompt_ids)
        generated = (batch.tokens[i, first:len(sample.tokens)] == layout.image_token_id).nonzero().flatten()
        if len(generated):
            batch.tokens[i, first + generated] = pad_id
            batch.loss_mask[i, first + int(generated[0]):] = 0.0
    batch.vision = list(vision)
    grid = batch.vision_inputs
    batch.position_ids = mrope_position_ids(batch.tokens, None if grid is None else grid.image_grid_thw,
                                            image_token_id=layout.image_token_id,
                                            spatial_merge_size=layout.spatial_merge_size)
