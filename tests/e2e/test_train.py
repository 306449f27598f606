"""End-to-end: `megatron-sapo train` on the CPU demo config with a real SGLang server and
Megatron at TP=2 over gloo, shortened; exact resume; a stop on SIGTERM and with the STOP file;
a start from Megatron weights (checkpoint.load_dir).

A straight 4-step run generating one step ahead (rollout.max_staleness = 1, with dynamic sampling
and a reward plugin) is compared with the same run stopped by the STOP file and resumed: with
seeded sampling and restored RNG/optimizer/data state and the groups generated ahead saved in
the checkpoint, reward_mean, loss and grad_norm must be identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# The demo's full cold start (130 steps) stays: after a shorter one every reward is 0, so every
# update is 0 and the resume test below would compare zeros. Later runs start from its model.
SHORT = ["--set", "rollout.prompts_per_step=8", "--set", "train.micro_batch_size=16",
         "--set", "eval.every=2", "--set", "eval.max_problems=8", "--set", "checkpoint.keep_last=2",
         "--set", "logging.histogram_every=2"]


DIAGNOSTICS_TOKENS, DIAGNOSTICS_SEQUENCES = 100, 40


def train(config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(REPO / config), "--output", str(out), *SHORT, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def from_start_model(straight: Path, folder: Path) -> Path:
    """The demo config, starting from the straight run's model (no second cold start)."""
    text = (REPO / "examples/tiny_cpu/sapo.toml").read_text()
    assert 'builtin = "tiny-qwen3-moe"' in text
    config = folder / "sapo.toml"
    config.write_text(text.replace('builtin = "tiny-qwen3-moe"', f'hf_dir = "{straight / "start_model"}"'))
    return config


def reverse_problems(path: Path, count: int) -> Path:
    """The task's first ``count`` validation problems as a prompt file (an eval set)."""
    from megatron_sapo.data.tasks import get_task

    path.write_text("".join(json.dumps({"prompt": r.prompt, "answer": r.answer}) + "\n"
                            for r in get_task("tiny-reverse").records("val", 0)[:count]))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    problems = reverse_problems(out.parent / "reverse_held_out.jsonl", 8)  # an eval set, 2 samples each
    # Diagnostics budgets below a step's ~250 response tokens and 64 sequences: the run samples.
    done = train("examples/tiny_cpu/sapo.toml", out, "--steps", "4", "--save-every", "2",
                 "--set", f"logging.diagnostics_tokens={DIAGNOSTICS_TOKENS}",
                 "--set", f"logging.diagnostics_sequences={DIAGNOSTICS_SEQUENCES}",
                 "--set", f'eval.sets=[{{name = "held_out", path = "{problems}", reward = "exact_match", '
                          'samples = 2}]')
    (out.parent / "straight_console.txt").write_text(done.stdout)
    return out


def test_outputs(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("reward_mean", "reward_std", "loss", "gate_mean", "entropy", "grad_norm", "lr", "kl_old",
                    "logprob_mismatch", "response_length_mean", "time_rollout_s", "time_train_s", "tokens_per_s"):
            assert key in row, key
        assert 0.0 <= row["reward_mean"] <= 1.0
        assert row["logprob_mismatch"] < 1e-4  # fp32 serving and training: measured 8.6e-7
    assert "pass_at_1" in rows[1] and "pass_at_1" in rows[3]
    for row in (rows[1], rows[3]):  # the eval set, every eval.every = 2 steps
        assert row["eval_held_out_problems"] == 8 and row["eval_held_out_reward_errors"] == 0
        assert 0 <= row["eval_held_out_pass_at_1"] <= row["eval_held_out_pass_at_2"] <= 1
        assert row["eval_held_out_avg_at_2"] == pytest.approx(row["eval_held_out_pass_at_1"])  # 0/1 reward
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/eval_held_out_pass_at_2", "train/loss", "rollout/reward_mean", "time/time_train_s"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/eval_held_out_pass_at_2")] == [2, 4]
    console = (straight.parent / "straight_console.txt").read_text()
    assert console.startswith("model ") and "algorithm SAPO (tau_pos 1.0, tau_neg 1.05)" in console
    assert str(straight / "curves.png") in console and (straight / "curves.png").stat().st_size > 10_000
    # Real updates happen, so the resume test compares something.
    assert max(r["reward_mean"] for r in rows) > 0 and min(r["grad_norm"] for r in rows) > 0
    assert (straight / "config.toml").read_text().count("[loss]") == 1
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (straight / "checkpoints" / "step_00000002").is_dir()
    assert list((straight / "logs").glob("sglang-*.log"))


def test_diagnose_the_run(straight, tmp_path):
    """The run stored its histogram steps' samples (steps 2 and 4) within their size bound, with
    exact counts; `megatron-sapo diagnose` writes the figures, and its statistics are those of
    the stored samples."""
    import numpy as np

    from megatron_sapo.analysis.diagnose import diagnose_run
    from megatron_sapo.run_diagnostics import size_bound, stored_steps

    stored = stored_steps(straight)
    assert list(stored) == [2, 4]
    rows = {r["step"]: r for r in metrics(straight)}
    result = diagnose_run(straight, tmp_path / "diagnose", steps=[2, 4])
    for summary, path in zip(result.steps, stored.values()):
        assert path.stat().st_size <= size_bound(DIAGNOSTICS_TOKENS, DIAGNOSTICS_SEQUENCES)
        raw = torch.load(path, weights_only=True)
        counts, sample = raw["counts"], {k: v.double().numpy() for k, v in raw["sample"].items()}
        # Every response token of the step is counted: 4 minibatches of `tokens` each.
        assert counts["tokens"] == pytest.approx(4 * rows[summary.step]["tokens"])
        assert counts["sequences"] == 64 and counts["tokens"] > DIAGNOSTICS_TOKENS
        assert (summary.sampled_tokens, summary.sampled_sequences) == (DIAGNOSTICS_TOKENS, DIAGNOSTICS_SEQUENCES)
        assert raw["loss"]["name"] == summary.loss == "sapo"
        assert summary.tokens_engaged_frac == counts["tokens_engaged"] / counts["tokens"]
        assert summary.sequences_engaged_frac == counts["sequences_engaged"] / counts["sequences"]
        ratio, var = sample["token_ratio"], sample["seq_log_ratio_var"]
        gap, bound = sample["seq_gate_gap"], sample["seq_gap_bound"]
        assert summary.ratio_mean == pytest.approx(ratio.mean(), rel=1e-9)
        assert summary.ratio_p50 == pytest.approx(np.median(ratio), rel=1e-9)
        assert summary.ratio_p99 == pytest.approx(np.quantile(ratio, 0.99), rel=1e-9)
        assert summary.var_mean == pytest.approx(var.mean(), rel=1e-9)
        assert summary.gap_max == pytest.approx(gap.max(), rel=1e-9)
        assert summary.bound_holds_frac == np.mean(gap <= bound) == 1.0
        assert np.any(ratio != 1.0), "the updates moved no ratio: the histograms show nothing"
    text = result.markdown.read_text()
    assert "Gate engaged (sapo): attenuated" in text and "| 4 |" in text
    for png in (result.ratios_png, result.gate_gap_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_without_checkpoint_is_an_error(tmp_path):
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(REPO / "examples/tiny_cpu/sapo.toml"),
           "--output", str(tmp_path / "none"), "--resume"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no checkpoint" in done.stderr


def start_and_wait_for_step(cmd: list[str], out: Path, step: int, stderr) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(out))):
        assert proc.poll() is None and time.monotonic() < deadline, f"step {step} did not finish"
        time.sleep(0.5)
    return proc


def test_sigterm_or_stop_file_ends_the_run_after_the_step_with_a_checkpoint(straight, tmp_path):
    config, out = from_start_model(straight, tmp_path), tmp_path / "stopped"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(config), "--output", str(out), *SHORT,
           "--steps", "20"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = start_and_wait_for_step(cmd, out, 1, stderr)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    steps = [r["step"] for r in metrics(out)]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 20
    latest = out / "checkpoints" / f"step_{last:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == latest.name
    assert f"stopped by SIGTERM: latest checkpoint {latest}; run the same command with --resume" in err
    for log in (out / "logs").glob("sglang-*.log"):  # the server went down with the trainer
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(log.stem.split("-")[1])), timeout=5)
    # The STOP file and the resume after it: test_bounded_staleness_and_dynamic_sampling_resume_exactly
    # (and, through SLURM's SIGUSR1, the rehearsal in test_slurm_scripts.py).


REWARD_PLUGIN = """
def reverse_reward(response, answer, fields):
    return {"score": float(response.strip() == answer), "chars": len(response)}
"""


def test_bounded_staleness_and_dynamic_sampling_resume_exactly(straight, tmp_path):
    """rollout.max_staleness = 1: step n trains groups the weights of step n - 2 sampled while
    step n - 1 trained (staleness 1 from step 2, never more), with dynamic sampling (groups of
    equal rewards dropped, more prompts sampled under the current weights) and a reward plugin
    file scored by 2 workers. A run stopped by the STOP file after any step (the checkpoint holds
    the groups generated ahead: one step finished, the next in flight or finished) and resumed
    equals a straight run, step for step."""
    config = from_start_model(straight, tmp_path)
    plugin = tmp_path / "reverse_reward.py"
    plugin.write_text(REWARD_PLUGIN)
    ahead = ["--steps", "4", "--save-every", "2", "--set", "rollout.max_staleness=1",
             "--set", "rollout.filter_groups=nonzero_std", "--set", "rollout.max_sampling_rounds=2",
             "--set", f"data.reward={plugin}:reverse_reward", "--set", "data.reward_workers=2"]
    train(str(config), tmp_path / "straight", *ahead)
    reference = metrics(tmp_path / "straight")
    assert [r["rollout_staleness_max"] for r in reference] == [0.0, 1.0, 1.0, 1.0]
    assert [r["rollout_weight_step"] for r in reference] == [0.0, 0.0, 1.0, 2.0]
    for row in reference:
        assert row["sampling_rounds"] in (1.0, 2.0) and 0 <= row["groups_filtered_frac"] < 1
        assert row["reward_chars_mean"] > 0 and row["reward_errors"] == 0
    assert any(r["groups_filtered_frac"] > 0 for r in reference), "no group was filtered: the test is blind"
    assert any(r["sampling_rounds"] == 2.0 for r in reference), "no second round was sampled"
    print("\nrollout seconds per step at k = 1 (generated ahead from step 2):",
          [round(r["time_rollout_s"], 3) for r in reference])

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(config), "--output", str(out), *SHORT, *ahead]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = start_and_wait_for_step(cmd, out, 1, stderr)
        (out / "STOP").touch()
        proc.wait(timeout=600)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    stopped_after = metrics(out)[-1]["step"]
    assert stopped_after < 4, "the run ended before the STOP file could stop it"
    assert f"stopped by the STOP file: latest checkpoint {out / 'checkpoints' / f'step_{stopped_after:08d}'}" in err
    assert not (out / "STOP").exists()  # consumed: the resumed run is not stopped by it again
    assert (out / "checkpoints" / f"step_{stopped_after:08d}" / "rollout_pipeline.pt").is_file()
    train(str(config), out, *ahead, "--resume")
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        for key in ("reward_mean", "loss", "grad_norm", "rollout_staleness_mean", "rollout_weight_step",
                    "groups_filtered_frac", "sampling_rounds"):
            assert ours[key] == theirs[key], (ours["step"], key, stopped_after)


def server_pid(out: Path) -> int:
    """The colocated SGLang server's process (its session leader), from its log's port."""
    port = next((out / "logs").glob("sglang-*.log")).stem.split("-")[1]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sglang.launch_server" in cmdline and port.encode() in cmdline:
            return int(proc.name)
    raise AssertionError(f"no SGLang server on port {port}")


def test_syncs_during_generation_and_a_server_killed_mid_overlap(straight, tmp_path):
    """max_staleness = 1 with partial = "continue": syncs pause the generation ahead and continue
    it under the new weights. The server is killed after step 1 and restarted with its start
    weights, by the request that finds it dead or by the next sync, whichever comes first; samples
    it drew before a sync gave it the current weights are too old when their step takes them, so
    the weights are synced again and those samples drawn again. Every step trains complete groups
    within the bound. The servers' log-probs are the behaviour policy (loss.behavior_logprobs =
    "rollout"): the trainer's old-log-prob pass is skipped."""
    config, out = from_start_model(straight, tmp_path), tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(config), "--output", str(out), *SHORT,
           "--steps", "3", "--set", "eval.every=0", "--set", "logging.histogram_every=0",
           "--set", "rollout.max_staleness=1", "--set", "rollout.partial=continue",
           "--set", "loss.behavior_logprobs=rollout"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = start_and_wait_for_step(cmd, out, 1, stderr)
        os.killpg(server_pid(out), signal.SIGKILL)
        proc.wait(timeout=900)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout_staleness_max"] <= 1 for r in rows)
    assert all(r["time_old_logprobs_s"] < 0.01 and "logprob_mismatch" not in r and r["grad_norm"] > 0 for r in rows)
    log = next((out / "logs").glob("sglang-*.log")).read_text()
    assert log.count("==== megatron-sapo: starting") == 2, "the server was not restarted once"
    resampled = "samples came from weights older than rollout.max_staleness allows" in err
    print(f"\nkilled after step 1: {rows[-1]['rollout_retries']:.0f} requests retried, "
          f"{rows[-1]['rollout_sync_interrupted']:.0f} stopped by syncs and continued; stale samples drawn again: "
          f"{resampled}; staleness max per step {[r['rollout_staleness_max'] for r in rows]}")


def test_policy_from_load_dir_is_served_from_the_first_step(straight, tmp_path):
    """The servers start from model.hf_dir's weights; the trainer loads other weights (the start
    model's, perturbed, converted with `convert hf-to-mcore`) and sends them to the servers
    before step 1, so the two sides agree on the log-probs of step 1's samples."""
    start, perturbed = straight / "start_model", tmp_path / "perturbed"
    shutil.copytree(start, perturbed)
    generator = torch.Generator().manual_seed(0)
    for path in perturbed.glob("*.safetensors"):
        tensors = {name: t * (1 + 0.1 * torch.randn(t.shape, generator=generator)) if t.is_floating_point() else t
                   for name, t in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "convert", "hf-to-mcore", "--hf", str(perturbed),
                    "--out", str(tmp_path / "mcore")], check=True, capture_output=True, timeout=600)
    config, out = from_start_model(straight, tmp_path), tmp_path / "from_checkpoint"
    train(str(config), out, "--steps", "1", "--set", f"checkpoint.load_dir={tmp_path / 'mcore'}")
    assert metrics(out)[0]["logprob_mismatch"] < 1e-4


def test_data_parallel_packed_run_under_torchrun(straight, tmp_path):
    """`torchrun --nproc_per_node=2 ... train --set parallel.tp=1` with packed microbatches under a
    token budget, generating one step ahead, and ICEPOP: two data-parallel replicas, each
    receiving and computing old log-probs for its own half of the step's 64 rows, give the TP=2
    padded run's first step (same global batch, same seeds). At step 1 the servers hold the
    trainer's weights (fp32: log-probs agree to about 1e-7), so ICEPOP masks nothing and weighs
    every token 1; step 2 trains samples a sync behind (max_staleness = 1), and the weights the
    replicas reduce move away from 1."""
    config, out = from_start_model(straight, tmp_path), tmp_path / "dp2"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "megatron_sapo.cli", "train", str(config),
           "--output", str(out), *SHORT, "--steps", "2", "--set", "eval.every=0", "--set", "parallel.tp=1",
           "--set", "train.max_tokens_per_microbatch=256", "--set", "train.pack_sequences=true",
           "--set", "loss.rollout_correction=icepop", "--set", "rollout.max_staleness=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, first = metrics(out), metrics(straight)[0]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["replica_rows_max"] == 32 for r in rows)  # 8 prompts x 8 samples over 2 replicas
    assert rows[0]["reward_mean"] == first["reward_mean"]
    for key in ("loss", "grad_norm", "kl_old"):
        assert abs(rows[0][key] - first[key]) <= 1e-5 * abs(first[key]), (key, rows[0][key], first[key])
    assert all(r["grad_norm"] > 0 and r["train_token_util"] > 0.95 for r in rows)
    assert rows[0]["train_token_util"] > first["train_token_util"]  # less padding than the padded run
    assert rows[0]["rollout_correction_masked_frac"] == 0.0
    assert abs(rows[0]["rollout_correction_weight_mean"] - 1) < 1e-5 and rows[0]["rollout_kl"] < 1e-10
    behind = rows[1]
    assert behind["rollout_staleness_max"] == 1 and behind["rollout_kl"] > 100 * max(rows[0]["rollout_kl"], 1e-12)
    assert abs(behind["rollout_correction_weight_mean"] - 1) > 1e-5, behind["rollout_correction_weight_mean"]
    print(f"\nstep 2, a sync behind: rollout_kl {behind['rollout_kl']:.2e}, ICEPOP weight mean "
          f"{behind['rollout_correction_weight_mean']:.5f} (max {behind['rollout_correction_weight_max']:.3f}), "
          f"masked {behind['rollout_correction_masked_frac']:.4f}")


def test_eval_command_evaluates_a_training_checkpoint(straight, tmp_path):
    """`megatron-sapo eval` on the straight run's latest checkpoint: written as an HF folder with
    the run's tokenizer, served by SGLang, and two sets evaluated on the task's validation
    problems as a prompt file: by exact match at temperature 1, and by a reward plugin at 0.5.
    avg@k and pass@k land in eval.json, eval.md and the last line printed."""
    plugin = tmp_path / "reverse_reward.py"
    plugin.write_text(REWARD_PLUGIN)
    problems = reverse_problems(tmp_path / "reverse_val.jsonl", 16)
    config = tmp_path / "eval.toml"
    config.write_text((REPO / "examples/tiny_cpu/sapo.toml").read_text() + f"""
[[eval.sets]]
name = "reverse"
path = "{problems}"
reward = "exact_match"
samples = 4

[[eval.sets]]
name = "reverse_cool"
path = "{problems}"
reward = "{plugin}:reverse_reward"
samples = 2
temperature = 0.5
""")
    out = tmp_path / "evaluated"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "eval", str(config), "--checkpoint",
           str(straight / "checkpoints"), "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {**json.loads((out / "eval.json").read_text()), "output": str(out)}
    assert result["eval_reverse_problems"] == 16 and result["eval_reverse_cool_problems"] == 16
    assert result["eval_reverse_cool_reward_chars_mean"] > 0  # the plugin's extra
    assert result["eval_reverse_avg_at_4"] == pytest.approx(result["eval_reverse_pass_at_1"])  # 0/1 reward
    assert result["eval_reverse_pass_at_1"] <= result["eval_reverse_pass_at_2"] <= result["eval_reverse_pass_at_4"]
    assert result["eval_reverse_pass_at_4"] > 0, "the trained model solved nothing: the test is blind"
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer_config.json").is_file()
    assert "| reverse | 16 | 4 |" in (out / "eval.md").read_text()
