"""Group-relative advantages (paper eq. 2).

For a query with G sampled responses and rewards ``R_1..R_G``:
``A_i = (R_i - mean(R)) / std(R)``. A group whose rewards are all equal carries no learning
signal; its advantages are exactly zero rather than 0/0.
"""

from __future__ import annotations

import torch


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [num_prompts, group_size]; got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor; got {rewards.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[N, G]`` rewards -> ``[N, G]`` advantages normalised by the group's mean and std.

    The standard deviation is the population one (divide by G), as in eq. 2. Groups whose
    spread is below ``eps`` get zero advantage.
    """
    _check_rewards(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    flat = std < eps
    return torch.where(flat, torch.zeros_like(centred), centred / torch.where(flat, torch.ones_like(std), std))
