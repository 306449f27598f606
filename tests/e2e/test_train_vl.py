"""End-to-end: `megatron-sapo train` on the vision-language CPU demo config (tiny Qwen3-VL-MoE,
"tiny-count" pictures) with a real SGLang server that is sent the pictures, and Megatron at TP=2
over gloo, shortened to 2 steps.

What it shows: pictures flow through the processor, SGLang's image_data and the trainer's
vision tower; the policy gets a gradient; the weights synced after step 1 (vision and text)
are the ones that generate step 2. The step-2 check is made sensitive on purpose: the learning
rate is raised to 1e-2 so that step 1 moves every weight with a gradient by about that much
(the config's 64 responses per step give the random model some reward in step 1 under its
sampling seed; the grad_norm assertion says so if not). Measured: the step-2 train/rollout
log-prob mismatch is 1.5e-7 with the sync, and 6.7e-2 when the vision weights alone are left
out of it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples/tiny_cpu_vl/sapo.toml"
SHORT = ["--steps", "2", "--set", "optimizer.lr=0.01", "--set", "eval.max_problems=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vl")
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(CONFIG), "--output", str(out), *SHORT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_vl_steps_train_and_sync_vision_and_text_weights(run):
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "reward_mean", "grad_norm", "entropy", "logprob_mismatch"):
            assert math.isfinite(row[key]), (row["step"], key)
        assert 0.0 <= row["reward_mean"] <= 1.0
        # fp32 serving and training: the same weights give the same log-probs (measured: ~1.5e-7).
        assert row["logprob_mismatch"] < 1e-4, row
    assert rows[0]["grad_norm"] > 0, "no reward in step 1: the sync check below would not be sensitive"
    assert [r["rollout_weight_step"] for r in rows] == [0.0, 1.0]  # step 2 sampled with step 1's weights
    assert "pass_at_1" in rows[1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    start = json.loads((run / "start_model" / "config.json").read_text())
    assert start["model_type"] == "qwen3_vl_moe"
    assert list((run / "logs").glob("sglang-*.log"))
