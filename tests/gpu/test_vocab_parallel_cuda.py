"""vocab_parallel_logprobs on a CUDA device, bf16 and fp32 logits of Qwen3's vocabulary size."""

import pytest
import torch

from megatron_sapo.parallel import vocab_parallel_logprobs


@pytest.mark.parametrize("dtype, grad_rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_matches_log_softmax_on_cuda(dtype, grad_rtol):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(512, 151_936, device="cuda", generator=g).mul_(4).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 151_936, (512,), device="cuda", generator=g)
    logp, ent = vocab_parallel_logprobs(logits, targets, temperature=0.9, entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    ref_logits = logits.detach().float().requires_grad_(True)
    logsm = torch.log_softmax(ref_logits / 0.9, -1)
    ref_logp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    (ref_logp.sum() + 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=2e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-4)
    # bf16 gradients: our fp32 result and the reference each rounded once, so one ulp apart at most.
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.to(logits.dtype).float(), rtol=grad_rtol, atol=1e-7)
