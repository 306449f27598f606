"""Supervised cold start of a Hugging Face checkpoint, before RL.

The paper's runs start from a cold-start model; the CPU demo makes its own from a random tiny
model with a few hundred steps of next-token training on (prompt, answer) pairs, so that the
reward starts between "never" and "always". It runs in one process with transformers (the
model is tiny), seeded, and rewrites the checkpoint in place.

Pairs whose prompt holds images (the vision-language demo) train the same way through the
model's image-text class, fed each row's pixel patches and image grids; the fused experts are
then rewritten in the Hub orientation that SGLang loads (transformers saves its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from megatron_sapo import torchvision_compat
from megatron_sapo.data.chat import SFTExample


def _batch(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and next-token labels (-100 outside the completions)."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    tokens = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.completion_ids
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(example.prompt_ids):len(ids)] = torch.tensor(example.completion_ids)
    return tokens, labels


def cold_start(hf_dir: str | Path, examples: Sequence[SFTExample], *, steps: int, batch_size: int, lr: float,
               seed: int, pad_id: int) -> list[float]:
    """Train ``hf_dir`` for ``steps`` AdamW steps on random batches of ``examples``; returns the
    loss of every step."""
    if not examples:
        raise ValueError("cold start needs at least one supervised example")
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with_images = any(e.vision is not None for e in examples)
    auto = AutoModelForImageTextToText if with_images else AutoModelForCausalLM
    generator = torch.Generator().manual_seed(seed)
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        chosen = [examples[i] for i in picks]
        tokens, labels = _batch(chosen, pad_id)
        images = _images(chosen, tokens, model.config.image_token_id) if with_images else {}
        loss = model(tokens, labels=labels, **images).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(hf_dir)
    if with_images:
        from megatron_sapo.convert.hf_layout import write_hub_expert_orientation

        write_hub_expert_orientation(model, Path(hf_dir))
    return losses


def _images(examples: Sequence[SFTExample], tokens: torch.Tensor, image_token_id: int) -> dict:
    """The rows' images as transformers' vision-language models take them."""
    vision = [e.vision for e in examples if e.vision is not None]
    return {"pixel_values": torch.cat([v.pixel_values for v in vision]),
            "image_grid_thw": torch.cat([v.image_grid_thw for v in vision]),
            "mm_token_type_ids": (tokens == image_token_id).int()}
