"""Supervised cold start of a Hugging Face checkpoint, before RL.

The paper's runs start from a cold-start model; the CPU demo makes its own from a random tiny
model with a few hundred steps of next-token training on (prompt, answer) pairs, so that the
reward starts between "never" and "always". It runs in one process with transformers (the
model is tiny), seeded, and rewrites the checkpoint in place.
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
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        tokens, labels = _batch([examples[i] for i in picks], pad_id)
        loss = model(tokens, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(hf_dir)
    return losses
