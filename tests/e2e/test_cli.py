"""The installed console script, run as a user would."""

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow

SCRIPT = shutil.which("megatron-sapo")


@pytest.fixture(scope="module")
def script():
    if SCRIPT is None:
        pytest.fail("the megatron-sapo console script is not on PATH; run tools/setup_env.sh")
    return SCRIPT


def test_help_lists_subcommands(script):
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "selfcheck" in out


def test_selfcheck_passes(script):
    proc = subprocess.run([script, "selfcheck"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed, 0 failed" in proc.stdout


# ---- plan --------------------------------------------------------------------------------------

PLAN_30B = ["plan", "examples/qwen3_30b_a3b/sapo.toml", "--hf-config", "examples/qwen3_30b_a3b/hf_config.json",
            "--nodes", "4", "--rollout-nodes", "2"]


def _plan(script, *args):
    import os
    from pathlib import Path

    repo = Path(__file__).parents[2]
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})


def test_plan_prints_the_breakdown_then_one_json_line(script):
    import json

    proc = _plan(script, *PLAN_30B, "--mfu", "0.3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "no GPU here and no --gpu-memory-gib: assuming 79.2 GiB per GPU" in proc.stdout
    assert any(line.startswith("  logits") for line in lines) and "fits" in proc.stdout
    summary = json.loads(lines[-1])
    assert summary["fits"] is True and summary["budget_gib"] == 79.2
    assert set(summary["breakdown"]) == {"params", "grads", "optimizer", "activations", "logits", "routes", "batch",
                                         "reserve"}
    assert abs(summary["peak_gib_per_gpu"] - sum(summary["breakdown"].values())) < 0.01
    assert summary["assumptions"]["mfu"] == 0.3 and summary["tokens_per_step"] == 1024 * 18432
    assert summary["train_flops_per_step"] > 1e18 and summary["step_s_estimate"] > 0


def test_plan_exits_1_with_the_reason_when_it_does_not_fit(script):
    proc = _plan(script, *PLAN_30B, "--gpu-memory-gib", "40")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "does not fit: training GPU of pipeline stage 0" in proc.stdout
    assert '"fits": false' in proc.stdout.splitlines()[-1]


def test_plan_bad_input_is_one_line(script):
    proc = _plan(script, *PLAN_30B, "--assume", "warp=9")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "megatron-sapo plan: error: unknown assumption warp"), proc.stderr
    proc = _plan(script, "plan", "examples/qwen3_30b_a3b/sapo.toml")
    assert proc.returncode == 2 and "checkpoints/Qwen3-30B-A3B/config.json: no such file" in proc.stderr
    assert "--hf-config" in proc.stderr
