"""Log-probs and entropy of sampled tokens from vocabulary-sharded logits.

Under tensor parallelism each rank holds logits for a contiguous slice of the vocabulary,
``[rank * V_local, (rank + 1) * V_local)``. A policy-gradient step needs, per token, the
log-prob of the sampled token and (for the entropy bonus and logging) the entropy. Both follow
from four per-token reductions over the vocabulary, so the op all-reduces ``max`` once and
``[sum exp, target logit, sum exp * z]`` once, and never materialises the full vocabulary.

Memory: the op saves its input (a reference, not a copy) and a few ``[N]`` vectors; the
softmax is recomputed in backward, inside the gradient buffer when the dtypes allow. Work is
done in fp32 (fp64 for fp64 input) over chunks of tokens, so the memory beyond the logits and
their gradient is two chunks in forward and one in backward (64 MiB each by default). Backward needs no communication: the reduced statistics are
already replicated on every rank.

Gradients, with ``z = logits / T`` and ``p = softmax(z)``:
``d logp_target / d z_j = [j = target] - p_j`` and ``d H / d z_j = -p_j (log p_j + H)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Working set per chunk when chunk_size is left to the op. On a GPU larger chunks keep kernels
# long enough to hide launch latency, and the memory they cost is small next to a logits shard.
_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` under ``softmax(logits / temperature)``, vocabulary-parallel.

    Args:
        logits: ``[..., V_local]``, this rank's contiguous vocabulary shard (any float dtype;
            not modified). With ``group=None`` it is the whole vocabulary.
        targets: ``[...]`` token ids in the *global* vocabulary.
        group: the tensor-parallel process group the vocabulary is split over.
        temperature: sampling temperature of the rollout; logits are divided by it.
        entropy: also return the per-token entropy of ``softmax(logits / temperature)``.
        vocab_size: the true vocabulary size when the logits carry padding (Megatron pads the
            vocabulary to a multiple of the TP size): columns at or beyond it take no
            probability mass and get zero gradient. Default: every column is a token.
        chunk_size: tokens processed at a time (default: as many as fit in 64 MiB of fp32 on
            CPU, 512 MiB on GPU).

    Returns:
        log-probs ``[...]`` in fp32 (fp64 for fp64 logits), or ``(logprobs, entropy)`` when ``entropy=True``; both are
        differentiable with respect to ``logits``.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected {tuple(logits.shape[:-1])} "
            f"(logits {tuple(logits.shape)} without the vocabulary dimension)"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must hold integer token ids; got {targets.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size is None:
        budget = _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES["cpu"])
        chunk_size = max(1, budget // (4 * max(1, logits.shape[-1])))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1; got {vocab_size}")

    lead = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).long()
    logp, ent = _VocabParallelLogProbs.apply(flat_logits, flat_targets, group, float(temperature), entropy,
                                             vocab_size, chunk_size)
    if entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 logits, fp64 for fp64 logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _shifted_chunk(logits: torch.Tensor, rows: slice, temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """``logits[rows] / T - shift`` in one pass, as a fresh buffer in the dtype of ``shift``."""
    return torch.add(-shift[rows].unsqueeze(-1), logits[rows], alpha=1.0 / temperature)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, temperature, want_entropy, vocab_size, chunk_size):
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        n, v_local = logits.shape
        vocab_start = rank * v_local
        # Columns of real tokens on this rank; the rest is vocabulary padding.
        valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))
        tokens = logits[:, :valid]

        dtype = _compute_dtype(logits)
        if valid:
            row_max = tokens.amax(dim=-1).to(dtype).div_(temperature)
        else:
            row_max = torch.full((n,), float("-inf"), dtype=dtype, device=logits.device)
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)

        in_shard = (targets >= vocab_start) & (targets < vocab_start + valid)
        local_targets = torch.where(in_shard, targets - vocab_start, torch.zeros_like(targets))
        target_logit = logits.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).to(dtype).div_(temperature)
        target_z = torch.where(in_shard, target_logit - row_max, torch.zeros_like(row_max))

        stats = torch.zeros(3 if want_entropy else 2, n, dtype=dtype, device=logits.device)
        stats[1] = target_z
        for rows in _chunks(n, chunk_size):
            z = _shifted_chunk(tokens, rows, temperature, row_max)
            e = torch.exp(z)
            stats[0, rows] = e.sum(-1)
            if want_entropy:
                stats[2, rows] = torch.einsum("nv,nv->n", e, z)
            del z, e
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)

        log_norm = stats[0].log()
        logp = stats[1] - log_norm
        ent = log_norm - stats[2] / stats[0] if want_entropy else None

        ctx.save_for_backward(logits, local_targets, in_shard, row_max, log_norm, ent if want_entropy else log_norm)
        ctx.temperature, ctx.want_entropy, ctx.chunk_size, ctx.valid = temperature, want_entropy, chunk_size, valid
        if want_entropy:
            return logp, ent
        ctx.mark_non_differentiable(log_norm)
        return logp, log_norm  # second output is a placeholder the wrapper drops

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_ent):
        logits, local_targets, in_shard, row_max, log_norm, ent = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        valid = ctx.valid
        grad_logits[:, valid:] = 0  # vocabulary padding
        tokens, grad_tokens = logits[:, :valid], grad_logits[:, :valid]
        in_place = grad_logits.dtype == row_max.dtype  # softmax can be built inside the gradient
        # Per token: grad_j = (1/T) * ([j = target] g_logp - p_j (g_logp + g_H (log p_j + H))).
        # Written as p_j * (a + b log p_j) plus the target term, with the 1/T folded into a, b.
        scale = -1.0 / temperature
        a = grad_logp * scale
        b = grad_ent * scale if ctx.want_entropy else None
        if ctx.want_entropy:
            a = a + b * ent
        target_grad = torch.where(in_shard, grad_logp, torch.zeros_like(grad_logp)) / temperature
        shift = row_max + log_norm
        for rows in _chunks(logits.shape[0] if valid else 0, ctx.chunk_size):  # all padding: zero gradient
            log_probs = _shifted_chunk(tokens, rows, temperature, shift)
            probs = torch.exp(log_probs, out=grad_tokens[rows] if in_place else None)
            if ctx.want_entropy:
                probs.mul_(log_probs.mul_(b[rows].unsqueeze(-1)).add_(a[rows].unsqueeze(-1)))
            else:
                probs.mul_(a[rows].unsqueeze(-1))
            probs.scatter_add_(-1, local_targets[rows].unsqueeze(-1), target_grad[rows].unsqueeze(-1))
            if not in_place:
                grad_tokens[rows] = probs
            del log_probs, probs
        return grad_logits, None, None, None, None, None, None
