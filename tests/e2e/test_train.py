"""End-to-end: `megatron-sapo train` on the CPU demo config with a real SGLang server and
Megatron at TP=2 over gloo, shortened; and exact resume.

A straight 4-step run is compared with a run stopped after step 2 and resumed to step 4: with
seeded sampling and restored RNG/optimizer/data state, reward_mean and loss must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--set", "train.sft_steps=60", "--set", "rollout.prompts_per_step=8", "--set", "train.micro_batch_size=16",
         "--set", "eval.every=2", "--set", "eval.max_problems=8", "--set", "checkpoint.keep_last=2",
         "--set", "logging.histogram_every=2"]


def train(config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(REPO / config), "--output", str(out), *SHORT, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train("examples/tiny_cpu/sapo.toml", out, "--steps", "4", "--save-every", "2")
    return out


def test_outputs(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("reward_mean", "reward_std", "loss", "gate_mean", "entropy", "grad_norm", "lr", "kl_old",
                    "logprob_mismatch", "response_length_mean", "time_rollout_s", "time_train_s", "tokens_per_s"):
            assert key in row, key
        assert 0.0 <= row["reward_mean"] <= 1.0
        assert row["logprob_mismatch"] < 2e-2  # fp32 serving and training
    assert "pass_at_1" in rows[1] and "pass_at_1" in rows[3]
    assert (straight / "config.toml").read_text().count("[loss]") == 1
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (straight / "checkpoints" / "step_00000002").is_dir()
    assert list((straight / "logs").glob("sglang-*.log"))


def test_resume_is_exact(straight, tmp_path):
    out = tmp_path / "resumed"
    train("examples/tiny_cpu/sapo.toml", out, "--steps", "2", "--save-every", "2")
    train("examples/tiny_cpu/sapo.toml", out, "--steps", "4", "--save-every", "2", "--resume")
    resumed, reference = metrics(out), metrics(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        assert ours["reward_mean"] == theirs["reward_mean"], ours["step"]
        assert ours["loss"] == theirs["loss"], ours["step"]


def test_resume_without_checkpoint_is_an_error(tmp_path):
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(REPO / "examples/tiny_cpu/sapo.toml"),
           "--output", str(tmp_path / "none"), "--resume"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no checkpoint" in done.stderr
