"""vocab_parallel_logprobs on 2 gloo ranks against log_softmax / entropy of the full logits."""

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.parallel import vocab_parallel_logprobs

VOCAB = 50  # 25 per rank: rank 1's shard starts at 25


def full_problem(dtype, n_tokens=(6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*n_tokens, VOCAB, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, n_tokens, generator=g)
    targets.view(-1)[:2] = torch.tensor([0, VOCAB - 1])  # first and last id: one on each shard
    weights = torch.randn(2, *n_tokens, generator=g, dtype=torch.float64).to(dtype)
    return logits, targets, weights


def reference(logits, targets, weights, temperature):
    logits = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(logits / temperature, -1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    (weights[0] * logp + weights[1] * ent).sum().backward()
    return logp.detach(), ent.detach(), logits.grad


def sharded(logits, targets, weights, temperature, group, chunk_size):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    width = logits.shape[-1] // world
    shard = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    before = shard.detach().clone()
    logp, ent = vocab_parallel_logprobs(shard, targets, group, temperature, entropy=True, chunk_size=chunk_size)
    (weights[0] * logp + weights[1] * ent).sum().backward()
    assert torch.equal(shard.detach(), before), "input logits were modified"
    return logp.detach(), ent.detach(), shard.grad, slice(rank * width, (rank + 1) * width)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_full_vocabulary(world, dtype, tol, temperature, chunk_size):
    logits, targets, weights = full_problem(dtype)
    ref_logp, ref_ent, ref_grad = reference(logits, targets, weights, temperature)
    logp, ent, grad, cols = sharded(logits, targets, weights, temperature, world, chunk_size)
    torch.testing.assert_close(logp, ref_logp.to(logp.dtype), rtol=0, atol=tol)
    torch.testing.assert_close(ent, ref_ent.to(ent.dtype), rtol=0, atol=tol)
    torch.testing.assert_close(grad, ref_grad[..., cols], rtol=0, atol=tol)


def test_logprobs_only_gradient(world):
    logits, targets, _ = full_problem(torch.float64, seed=1)
    ref_logits = logits.clone().requires_grad_(True)
    torch.log_softmax(ref_logits, -1).gather(-1, targets.unsqueeze(-1)).sum().backward()
    rank = dist.get_rank(world)
    shard = logits[..., rank * 25:(rank + 1) * 25].clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(shard, targets, world)
    logp.sum().backward()
    torch.testing.assert_close(shard.grad, ref_logits.grad[..., rank * 25:(rank + 1) * 25], rtol=0, atol=1e-10)


def test_bfloat16_logits_reduce_in_fp32(world):
    logits, targets, _ = full_problem(torch.float32, seed=2)
    logits = logits.bfloat16()
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rank = dist.get_rank(world)
    logp = vocab_parallel_logprobs(logits[..., rank * 25:(rank + 1) * 25], targets, world)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)


def test_ranks_return_identical_values(world):
    logits, targets, _ = full_problem(torch.float32, seed=3)
    rank = dist.get_rank(world)
    logp = vocab_parallel_logprobs(logits[..., rank * 25:(rank + 1) * 25], targets, world)
    gathered = [torch.empty_like(logp) for _ in range(dist.get_world_size(world))]
    dist.all_gather(gathered, logp, group=world)
    assert all(torch.equal(gathered[0], g) for g in gathered)


@pytest.mark.parametrize("true_vocab", [40, 25, 20])  # rank 1 holds 15, 0 and 0 real tokens
def test_padded_vocabulary(world, true_vocab):
    logits, targets, weights = full_problem(torch.float64, seed=4)
    targets = targets % true_vocab
    logits[..., true_vocab:] = 30.0  # padding rows hold garbage that must not count
    ref_logp, ref_ent, ref_grad = reference(logits[..., :true_vocab], targets, weights, 0.9)
    rank = dist.get_rank(world)
    shard = logits[..., rank * 25:(rank + 1) * 25].clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(shard, targets, world, 0.9, entropy=True, vocab_size=true_vocab)
    (weights[0] * logp + weights[1] * ent).sum().backward()
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    padded_grad = torch.cat([ref_grad, torch.zeros(*ref_grad.shape[:-1], VOCAB - true_vocab, dtype=ref_grad.dtype)], -1)
    torch.testing.assert_close(shard.grad, padded_grad[..., rank * 25:(rank + 1) * 25], rtol=0, atol=1e-10)
