"""Section 4.1 diagnostics: Var_i, D_i and the bound D_i <= tau^2/4 Var_i (eq. 21)."""

import math
import statistics

import pytest
import torch

from megatron_sapo.algo import gate_diagnostics, histogram, log_ratio_variance

pytestmark = pytest.mark.unit


def sech2(x):
    return 1.0 / math.cosh(x) ** 2


def test_values_against_definitions():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 9, generator=g, dtype=torch.float64)
    logp = old + 0.4 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) < 0.7
    mask[:, 0] = True
    mask[3] = False  # dropped: no response tokens
    d = gate_diagnostics(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    assert d.gate_gap.shape == (3,)
    for i in range(3):
        z = [(logp[i, t] - old[i, t]).item() for t in range(9) if mask[i, t]]
        tau = 1.0 if adv[i] > 0 else 1.05
        mu, var = statistics.fmean(z), statistics.pvariance(z)
        gap = abs(statistics.fmean(sech2(tau * x / 2) for x in z) - sech2(tau * mu / 2))
        assert d.log_ratio_var[i].item() == pytest.approx(var, rel=1e-6)
        assert d.gate_gap[i].item() == pytest.approx(gap, rel=1e-5, abs=1e-9)
        assert d.gap_bound[i].item() == pytest.approx(tau**2 / 4 * var, rel=1e-6)
        assert d.tau[i].item() == pytest.approx(tau)
    assert d.token_ratios.numel() == int(mask.sum())


@pytest.mark.parametrize("spread", [1e-3, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("tau", [0.5, 1.05, 4.0])
def test_gap_never_exceeds_bound(spread, tau):
    g = torch.Generator().manual_seed(int(spread * 1000) + int(tau * 10))
    old = -torch.rand(256, 32, generator=g, dtype=torch.float64) * 4
    logp = old + spread * torch.randn(256, 32, generator=g, dtype=torch.float64) + 0.3 * spread
    adv = torch.randn(256, generator=g, dtype=torch.float64)
    mask = torch.rand(256, 32, generator=g) < 0.8
    mask[:, 0] = True
    d = gate_diagnostics(logp, old, adv, mask, tau_pos=tau, tau_neg=tau)
    assert torch.all(d.gate_gap <= d.gap_bound * (1 + 1e-6) + 1e-12)
    if spread <= 0.1:  # in the small-variance regime the bound is nearly tight
        assert (d.gate_gap / d.gap_bound).max().item() > 0.5


def test_constant_log_ratio_has_zero_variance_and_gap():
    old = torch.zeros(2, 5, dtype=torch.float64)
    logp = old + 0.7
    d = gate_diagnostics(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 5, dtype=torch.bool))
    assert torch.all(d.log_ratio_var.abs() < 1e-12) and torch.all(d.gate_gap.abs() < 1e-7)


def test_log_ratio_variance_ignores_masked_garbage():
    z = torch.tensor([[1.0, 3.0, 1e9]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    assert log_ratio_variance(z, mask).item() == pytest.approx(1.0)


def test_histogram_counts_every_value_once():
    values = torch.tensor([-5.0, 0.0, 0.1, 0.5, 0.99, 1.0, 2.0, 9.0])
    counts, edges = histogram(values, bins=4, low=0.0, high=1.0)
    assert edges.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert counts.tolist() == [3, 0, 1, 4]
    assert int(counts.sum()) == values.numel()
