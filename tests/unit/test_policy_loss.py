"""policy_loss against the paper's equations (paper_reference.py), in float64."""

import math

import pytest
import torch

import paper_reference as ref
from megatron_sapo.algo import policy_loss
from megatron_sapo.algo.loss import loss_normalizer
from megatron_sapo.config import LOSS_NAMES, LossConfig

pytestmark = pytest.mark.unit


def make_batch(seed=0, batch=5, length=7, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.75
    mask[:, 0] = True
    return logp, old, adv, mask


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_value_matches_paper_equations(name):
    logp, old, adv, mask = make_batch()
    cfg = LossConfig(name=name, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    loss, _ = policy_loss(logp, old, adv, mask, cfg)
    expected = -ref.objective(*as_lists(logp, old, adv, mask), name, eps_low=0.2, eps_high=0.28, c=3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_gspo_uses_published_ranges_by_default():
    logp, old, adv, mask = make_batch(spread=1e-3)
    loss, _ = policy_loss(logp, old, adv, mask, LossConfig(name="gspo"))
    expected = -ref.objective(*as_lists(logp, old, adv, mask), "gspo", eps_low=3e-4, eps_high=4e-4)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_sapo_gradient_is_eq8():
    logp, old, adv, mask = make_batch(spread=0.8)
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, LossConfig(name="sapo", tau_pos=1.0, tau_neg=1.05))
    loss.backward()
    expected = torch.tensor(ref.sapo_grad(*as_lists(logp.detach(), old, adv, mask)), dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_sapo_uses_tau_neg_for_zero_advantage():
    logp, old, _, mask = make_batch(spread=0.8)
    adv = torch.zeros(logp.shape[0], dtype=torch.float64)
    adv[0] = 0.0
    cfg = LossConfig(name="sapo", tau_pos=0.5, tau_neg=3.0)
    _, metrics = policy_loss(logp, old, adv, mask, cfg)
    ratios = torch.exp(logp - old)[mask]
    expected = sum(ref.sapo_f(r, 3.0) for r in ratios.tolist()) / len(ratios)
    assert metrics["gate_mean"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("tau", [0.05, 1.0, 1.05, 8.0, 100.0])
def test_on_policy_gradient_is_the_unclipped_one(name, tau):
    _, old, adv, mask = make_batch()
    logp = old.clone().requires_grad_(True)
    cfg = LossConfig(name=name, tau_pos=tau, tau_neg=tau * 1.05)
    policy_loss(logp, old, adv, mask, cfg)[0].backward()
    lengths = mask.sum(-1, keepdim=True).double()
    expected = torch.where(mask, -adv[:, None] / (lengths * mask.any(-1).sum()), torch.zeros_like(old))
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_sapo_with_tiny_tau_approaches_unclipped_objective():
    logp, old, adv, mask = make_batch(spread=1.0)
    pg = -ref.objective(*as_lists(logp, old, adv, mask), "pg")
    pg_grad = _grad(logp, old, adv, mask, LossConfig(name="grpo", eps_low=1 - 1e-12, eps_high=1e12))
    for tau, tol in [(1e-2, 1e-2), (1e-4, 1e-6)]:
        cfg = LossConfig(name="sapo", tau_pos=tau, tau_neg=tau)
        loss, _ = policy_loss(logp, old, adv, mask, cfg)
        # f(r) = 2/tau + (r - 1) + O(tau^2): remove the constant 2/tau - 1 from every token.
        constant = -ref.objective(*as_lists(old, old, adv, mask), "sapo", tau, tau) + ref.objective(
            *as_lists(old, old, adv, mask), "pg")
        assert loss.item() - constant == pytest.approx(pg, abs=tol)
        torch.testing.assert_close(_grad(logp, old, adv, mask, cfg), pg_grad, rtol=tol, atol=tol)


def test_grpo_with_huge_eps_equals_unclipped_objective():
    logp, old, adv, mask = make_batch(spread=2.0)
    cfg = LossConfig(name="grpo", eps_low=1 - 1e-12, eps_high=1e12)
    loss, metrics = policy_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(-ref.objective(*as_lists(logp, old, adv, mask), "pg"), rel=1e-12)
    assert metrics["clip_frac_low"].item() == 0 and metrics["clip_frac_high"].item() == 0


def test_grpo_clip_fractions_and_dual_clip():
    old = torch.zeros(4, 1, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5], [1.5], [5.0], [1.0]], dtype=torch.float64))
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    cfg = LossConfig(name="grpo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    loss, m = policy_loss(logp.requires_grad_(True), old, adv, mask, cfg)
    # rows: clipped low (A<0, r<0.8); clipped high (A>0, r>1.28); dual clipped (A<0, r>3); free.
    assert m["clip_frac_low"].item() == pytest.approx(0.25)
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac_dual"].item() == pytest.approx(0.25)
    expected = -(0.8 * -1 + 1.28 * 1 + 3.0 * -1 + 1.0 * 1) / 4
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert logp.grad[:3].abs().max().item() == 0.0  # all three clipped rows have zero gradient
    assert logp.grad[3].item() == pytest.approx(-0.25)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_float64(name):
    logp, old, adv, mask = make_batch(seed=3, batch=3, length=4, spread=0.05)
    cfg = LossConfig(name=name, eps_low=0.2, eps_high=0.28, kl_coef=0.1)
    ref_lp = old + 0.1
    entropy = torch.rand_like(old)
    cfg_ent = cfg.replace(entropy_coef=0.01)

    def fn(lp, ent):
        return policy_loss(lp, old, adv, mask, cfg_ent, ref_logprobs=ref_lp, entropy=ent)[0]

    assert torch.autograd.gradcheck(fn, (logp.requires_grad_(True), entropy.requires_grad_(True)))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_tokens_get_exactly_zero_gradient_even_when_garbage(name):
    logp, old, adv, mask = make_batch()
    logp = logp.masked_fill(~mask, float("nan"))
    old = old.masked_fill(~mask, float("inf"))
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, old, adv, mask, LossConfig(name=name))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(logp.grad[~mask] == 0)
    assert torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for k, v in metrics.items())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_extreme_ratios_give_finite_loss_and_gradient(name):
    logp, old, adv, mask = make_batch()
    logp = (old + torch.where(torch.rand_like(old) < 0.5, 1000.0, -1000.0)).float().requires_grad_(True)
    loss, metrics = policy_loss(logp, old.float(), adv.float(), mask, LossConfig(name=name))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert math.isfinite(metrics["ratio_max"].item())


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_microbatch_split_with_global_normalizer_sums_to_full_batch(agg, name):
    logp, old, adv, mask = make_batch(seed=1, batch=8, length=6, spread=0.5)
    mask[5] = False  # a padding row: counts for nothing
    cfg = LossConfig(name=name, agg=agg)
    full_lp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, old, adv, mask, cfg)
    full.backward()

    parts = [slice(0, 3), slice(3, 5), slice(5, 6), slice(6, 8)]  # includes an all-padding microbatch
    normalizer = sum(loss_normalizer(mask[p], agg) for p in parts)
    split_lp = logp.clone().requires_grad_(True)
    total = sum(policy_loss(split_lp[p], old[p], adv[p], mask[p], cfg, normalizer=normalizer)[0] for p in parts)
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)


def test_aggregations_by_hand():
    logp = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    cfg = LossConfig(name="grpo")
    # r = 1 everywhere: token loss = -A.
    assert policy_loss(logp, old, adv, mask, cfg.replace(agg="token-mean"))[0].item() == pytest.approx((-3 + 2) / 4)
    assert policy_loss(logp, old, adv, mask, cfg)[0].item() == pytest.approx((-1 + 2) / 2)
    assert policy_loss(logp, old, adv, mask, cfg.replace(agg="seq-mean-token-sum"))[0].item() == pytest.approx((-3 + 2) / 2)


def test_kl_estimators_and_entropy_bonus():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    ref_lp = torch.log(torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    old = logp.clone()
    adv = torch.zeros(1, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    entropy = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    for est, per_token in [("k1", [math.log(2), -math.log(2)]),
                           ("k3", [0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1])]:
        cfg = LossConfig(name="sapo", kl_coef=0.5, kl_estimator=est, entropy_coef=0.1)
        loss, m = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref_lp, entropy=entropy)
        kl = sum(per_token) / 2
        assert m["kl_ref"].item() == pytest.approx(kl)
        assert m["entropy"].item() == pytest.approx(2.0)
        assert loss.item() == pytest.approx(0.5 * kl - 0.1 * 2.0)


def test_sapo_metrics_match_definitions():
    logp, old, adv, mask = make_batch(spread=2.0)
    _, m = policy_loss(logp, old, adv, mask, LossConfig(name="sapo"))
    weights, ratios = [], []
    for i in range(logp.shape[0]):
        tau = 1.0 if adv[i] > 0 else 1.05
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                ratios.append(r)
                weights.append(ref.sapo_weight(r, tau))
    assert m["attenuated_frac"].item() == pytest.approx(sum(w < 0.5 for w in weights) / len(weights))
    assert 0 < m["attenuated_frac"].item() < 1
    assert m["grad_weight_mean"].item() == pytest.approx(sum(weights) / len(weights), rel=1e-6)
    assert m["ratio_min"].item() == pytest.approx(min(ratios), rel=1e-6)
    assert m["ratio_max"].item() == pytest.approx(max(ratios), rel=1e-6)
    assert m["tokens"].item() == len(ratios)


def test_bad_inputs_are_rejected_with_the_tensor_named():
    logp, old, adv, mask = make_batch()
    cfg = LossConfig()
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(logp, old[:, :-1], adv, mask, cfg)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(logp, old, adv[:-1], mask, cfg)
    with pytest.raises(ValueError, match="loss_mask selects no token"):
        policy_loss(logp, old, adv, torch.zeros_like(mask), cfg)
    bad = logp.clone()
    bad[mask.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(ValueError, match="logprobs has NaN"):
        policy_loss(bad, old, adv, mask, cfg)
    with pytest.raises(ValueError, match="advantages has NaN"):
        policy_loss(logp, old, adv * float("inf"), mask, cfg)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(logp, old, adv, mask, cfg.replace(kl_coef=0.1))
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
        policy_loss(logp[0], old[0], adv, mask[0], cfg)


def test_empty_microbatch_with_explicit_normalizer_is_zero():
    logp, old, adv, mask = make_batch()
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, torch.zeros_like(mask), LossConfig(), normalizer=4.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)


def _grad(logp, old, adv, mask, cfg):
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, adv, mask, cfg)[0].backward()
    return lp.grad
