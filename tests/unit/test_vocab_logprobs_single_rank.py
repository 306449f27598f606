"""vocab_parallel_logprobs with the whole vocabulary on one rank (group=None)."""

import pytest
import torch

from megatron_sapo.parallel import vocab_parallel_logprobs

pytestmark = pytest.mark.unit


def problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 33, generator=g, dtype=dtype), torch.randint(0, 33, (4, 3), generator=g)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_values_match_log_softmax(temperature):
    logits, targets = problem()
    logp, ent = vocab_parallel_logprobs(logits, targets, temperature=temperature, entropy=True)
    logsm = torch.log_softmax(logits / temperature, -1)
    torch.testing.assert_close(logp, logsm.gather(-1, targets[..., None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, -(logsm.exp() * logsm).sum(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("entropy", [False, True])
def test_gradcheck(entropy):
    logits, targets = problem()
    logits.requires_grad_(True)

    def fn(x):
        out = vocab_parallel_logprobs(x, targets, temperature=0.8, entropy=entropy, chunk_size=5)
        return out if not entropy else out[0] + 0.5 * out[1]

    assert torch.autograd.gradcheck(fn, (logits,))


def test_input_is_not_modified_and_chunking_is_invisible():
    logits, targets = problem(torch.float32)
    before = logits.clone()
    a = vocab_parallel_logprobs(logits, targets, chunk_size=1)
    b = vocab_parallel_logprobs(logits, targets)
    assert torch.equal(logits, before)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_inputs():
    logits, targets = problem()
    with pytest.raises(ValueError, match="targets has shape"):
        vocab_parallel_logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_logprobs(logits, targets.double())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        vocab_parallel_logprobs(logits, targets, chunk_size=0)


@pytest.mark.parametrize("entropy", [False, True])
def test_padded_vocabulary_columns_are_excluded(entropy):
    logits, targets = problem()
    padded = torch.cat([logits, torch.full((4, 3, 7), 50.0, dtype=logits.dtype)], dim=-1).requires_grad_(True)
    out = vocab_parallel_logprobs(padded, targets, temperature=0.8, entropy=True, vocab_size=33)
    ref_logits = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(ref_logits / 0.8, -1)
    ref = (logsm.gather(-1, targets[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1))
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-12)
    weight = 0.5 if entropy else 0.0
    (out[0].sum() + weight * out[1].sum()).backward()
    (ref[0].sum() + weight * ref[1].sum()).backward()
    torch.testing.assert_close(padded.grad[..., :33], ref_logits.grad, rtol=0, atol=1e-12)
    assert torch.all(padded.grad[..., 33:] == 0)
