from pathlib import Path

import pytest

from megatron_sapo.config import ConfigError, LossConfig

pytestmark = pytest.mark.unit


def test_defaults_are_the_papers():
    cfg = LossConfig()
    assert (cfg.name, cfg.tau_pos, cfg.tau_neg, cfg.agg) == ("sapo", 1.0, 1.05, "seq-mean-token-mean")
    assert cfg.kl_coef == 0 and cfg.entropy_coef == 0 and cfg.dual_clip_c is None


def test_clip_ranges_default_per_algorithm_and_can_be_overridden():
    assert (LossConfig(name="grpo").eps_low, LossConfig(name="grpo").eps_high) == (0.2, 0.28)
    assert (LossConfig(name="gspo").eps_low, LossConfig(name="gspo").eps_high) == (3e-4, 4e-4)
    assert LossConfig(name="grpo", eps_high=0.2).eps_high == 0.2


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"name": "ppo"}, "loss.name"),
        ({"agg": "mean"}, "loss.agg"),
        ({"tau_pos": 0.0}, "loss.tau_pos"),
        ({"tau_neg": -1.0}, "loss.tau_neg"),
        ({"name": "grpo", "eps_low": 1.5}, "loss.eps_low"),
        ({"eps_high": "big"}, "loss.eps_high"),
        ({"dual_clip_c": 0.5}, "loss.dual_clip_c"),
        ({"kl_coef": -0.1}, "loss.kl_coef"),
        ({"kl_estimator": "k2"}, "loss.kl_estimator"),
    ],
)
def test_bad_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        LossConfig(**changes)


def test_a_kl_term_is_refused_when_the_config_loads():
    """The trainer computes no reference-policy log-probs: say so before anything starts."""
    from megatron_sapo.config_file import load_config

    with pytest.raises(ConfigError, match=r"loss.kl_coef = 0.1: the trainer computes no reference-policy log-probs"):
        load_config(Path(__file__).parents[2] / "examples" / "tiny_cpu" / "sapo.toml", ["loss.kl_coef=0.1"])
