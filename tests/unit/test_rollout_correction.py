"""Rollout corrections (TIS, MIS, ICEPOP) against their equations written out here element by
element, their composition with every objective, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sapo.algo.correction import correction_metrics, correction_sums, rollout_correction
from megatron_sapo.algo.loss import policy_loss
from megatron_sapo.config import (LOSS_NAMES, ConfigError, DataConfig, LossConfig, ModelConfig, RolloutConfig,
                                  RouterConfig, RunConfig, TrainConfig)

LOW, HIGH = 0.5, 2.0


@pytest.fixture
def batch():
    torch.manual_seed(0)
    rollout = -torch.rand(4, 6) * 3
    old = rollout + torch.randn(4, 6) * 0.6  # ratios spread on both sides of the band
    old[2] += 1.0  # a sequence the rollout engine saw quite differently (MIS masks it)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, :2] = 0
    return old.double(), rollout.double(), mask


def by_hand(old, rollout, mask, method):
    """Weights and keep flags, one element at a time."""
    rows, cols = old.shape
    weights = [[0.0] * cols for _ in range(rows)]
    keep = [[False] * cols for _ in range(rows)]
    for i in range(rows):
        tokens = [t for t in range(cols) if mask[i, t]]
        seq_rho = math.exp(sum(float(old[i, t] - rollout[i, t]) for t in tokens) / len(tokens))
        for t in tokens:
            rho = math.exp(float(old[i, t] - rollout[i, t]))
            if method == "tis":
                weights[i][t], keep[i][t] = min(rho, HIGH), True
            elif method == "mis":
                inside = LOW <= seq_rho <= HIGH
                weights[i][t], keep[i][t] = (seq_rho if inside else 0.0), inside
            else:  # icepop
                inside = LOW <= rho <= HIGH
                weights[i][t], keep[i][t] = (rho if inside else 0.0), inside
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(keep)


@pytest.mark.parametrize("method", ["tis", "mis", "icepop"])
def test_weights_and_masks_follow_the_equations(batch, method):
    old, rollout, mask = batch
    got = rollout_correction(old, rollout, mask, method, LOW, HIGH)
    weights, keep = by_hand(old, rollout, mask, method)
    assert torch.equal(got.keep, keep)
    torch.testing.assert_close(got.weights, weights, rtol=1e-12, atol=1e-12)
    # The test data exercise the band: something is truncated or masked, something kept.
    rho = torch.exp(old - rollout)[mask.bool()]
    assert ((rho < LOW) | (rho > HIGH)).any() and ((rho >= LOW) & (rho <= HIGH)).any()
    if method != "tis":
        assert 0 < keep.sum() < mask.sum()


def test_none_keeps_every_response_token_at_weight_one(batch):
    old, rollout, mask = batch
    got = rollout_correction(old, rollout, mask, "none", LOW, HIGH)
    assert torch.equal(got.keep, mask.bool()) and torch.equal(got.weights, mask.double())


def test_metrics_count_what_was_masked_and_the_train_rollout_kl(batch):
    old, rollout, mask = batch
    got = rollout_correction(old, rollout, mask, "icepop", LOW, HIGH)
    sums = correction_sums(got, old, rollout, mask)
    metrics = correction_metrics(sums, sums[4].item())
    kept = got.keep
    assert metrics["rollout_correction_masked_frac"] == pytest.approx(1 - kept.sum().item() / mask.sum().item())
    assert metrics["rollout_correction_weight_mean"] == pytest.approx(got.weights[kept].mean().item())
    assert metrics["rollout_correction_weight_max"] == pytest.approx(got.weights[kept].max().item())
    d = (old - rollout)[mask.bool()]
    assert metrics["rollout_kl"] == pytest.approx((torch.exp(d) - d - 1).mean().item())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_weights_multiply_each_tokens_objective_and_masking_renormalises(batch, name):
    """loss(weights w) == - sum_t w_t f_t A / N over the kept tokens, N counted after masking;
    a token masked out changes neither the loss nor any gradient but its own (zero)."""
    old, rollout, mask = batch
    cfg = LossConfig(name=name, agg="token-mean")
    torch.manual_seed(1)
    logprobs = (old + torch.randn_like(old) * 0.05).requires_grad_()
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2], dtype=torch.float64)
    got = rollout_correction(old, rollout, mask, "icepop", LOW, HIGH)
    loss, _ = policy_loss(logprobs, old, advantages, got.keep.double(), cfg, token_weights=got.weights)
    unweighted, _ = policy_loss(logprobs, old, advantages, got.keep.double(), cfg, token_weights=None)
    assert not torch.allclose(loss, unweighted), "the weights changed nothing: the test is blind"
    # The per-token objective, taken from the unweighted loss's per-token gradient structure:
    # rebuild it directly for SAPO and GRPO (GSPO's token term depends on the whole row).
    if name != "gspo":
        per_token = []
        for i in range(4):
            for t in range(6):
                if not got.keep[i, t]:
                    continue
                one = torch.zeros_like(mask)
                one[i, t] = 1
                value, _ = policy_loss(logprobs.detach(), old, advantages, one, cfg, normalizer=1.0)
                per_token.append(float(got.weights[i, t]) * value.item())
        assert loss.item() == pytest.approx(sum(per_token) / got.keep.sum().item(), rel=1e-9)
    loss.backward()
    assert torch.all(logprobs.grad[~got.keep] == 0)


def test_config_refuses_bad_bands_and_meaningless_combinations():
    with pytest.raises(ConfigError, match="rollout_correction_low = 2.0 must be below"):
        LossConfig(rollout_correction="tis", rollout_correction_low=2.0, rollout_correction_high=0.5)
    with pytest.raises(ConfigError, match="rollout_correction_low must be a number >= 0"):
        LossConfig(rollout_correction_low=-0.1)
    with pytest.raises(ConfigError, match="loss.rollout_correction must be one of"):
        LossConfig(rollout_correction="is")
    with pytest.raises(ConfigError, match='behavior_logprobs = "rollout" does not compute'):
        LossConfig(behavior_logprobs="rollout", rollout_correction="icepop")
    with pytest.raises(ConfigError, match='records the routes train.routing_replay = "r2" replays'):
        RunConfig(model=ModelConfig(builtin="tiny-qwen3-moe"), data=DataConfig(task="tiny-reverse"),
                  loss=LossConfig(behavior_logprobs="rollout"), train=TrainConfig(routing_replay="r2"),
                  router=RouterConfig(routing_replay=True))


def test_config_refuses_bad_staleness_settings():
    with pytest.raises(ConfigError, match="rollout.max_staleness must be an integer >= 0"):
        RolloutConfig(max_staleness=-1)
    with pytest.raises(ConfigError, match="release_memory_during_train frees the servers' memory"):
        RolloutConfig(max_staleness=1, release_memory_during_train=True)
    with pytest.raises(ConfigError, match='rollout.partial = "abort" needs rollout.max_staleness >= 1'):
        RolloutConfig(partial="abort")
    with pytest.raises(ConfigError, match="rollout.partial must be one of"):
        RolloutConfig(max_staleness=1, partial="resume")
    assert RolloutConfig(max_staleness=2, partial="continue").max_staleness == 2
