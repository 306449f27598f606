import statistics

import pytest
import torch

from megatron_sapo.algo import group_advantages

pytestmark = pytest.mark.unit


def test_eq2_against_statistics_module():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.3, 0.9, -1.2, 4.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    for row, out in zip(rewards.tolist(), adv.tolist()):
        mean, std = statistics.fmean(row), statistics.pstdev(row)
        assert out == pytest.approx([(r - mean) / std for r in row], rel=1e-12)


def test_identical_rewards_give_zero_advantage_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert torch.all(adv[:2] == 0)
    assert adv[2].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


def test_single_sample_groups_are_zero():
    assert torch.all(group_advantages(torch.tensor([[3.0], [5.0]])) == 0)


@pytest.mark.parametrize(
    "rewards, message",
    [
        (torch.ones(4), "num_prompts, group_size"),
        (torch.ones(2, 3, dtype=torch.int64), "floating-point"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
    ],
)
def test_bad_rewards_rejected(rewards, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards)
