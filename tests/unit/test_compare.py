"""`megatron-sapo compare` on run folders written to disk: config.toml from dump_config (as the
trainer writes it) and metrics.jsonl with synthetic curves whose best, final and collapse steps
are known by construction. Numbers are checked as printed in compare.md (4 decimals).
"""

import argparse
import json

import matplotlib.image
import numpy as np
import pytest

from megatron_sapo.analysis import compare_runs, read_run
from megatron_sapo.analysis.compare import register
from megatron_sapo.analysis.report import DPI, FIGURE_SIZE, plot_comparison
from megatron_sapo.analysis.runs import RunFolderError
from megatron_sapo.analysis.summary import (Collapse, detect_collapse, entropy_collapse_step, reward_collapse_step,
                                            trailing_mean)
from megatron_sapo.analysis.runs import Curve
from megatron_sapo.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig
from megatron_sapo.config_file import dump_config

pytestmark = pytest.mark.unit


def write_run(folder, loss="sapo", seed=0, routing="none", rows=(), tau_pos=1.0, tau_neg=1.05):
    folder.mkdir(parents=True)
    cfg = RunConfig(model=ModelConfig(builtin="tiny-qwen3-moe"), data=DataConfig(train_path="prompts.jsonl"),
                    loss=LossConfig(name=loss, tau_pos=tau_pos, tau_neg=tau_neg),
                    train=TrainConfig(seed=seed, routing_replay=routing, out_dir=str(folder)))
    (folder / "config.toml").write_text(dump_config(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def rising(offset: float, last_step: int) -> list[dict]:
    """SAPO-like: reward 0.1 + 0.01 * step + offset; Pass@1 = reward / 2 every 10 steps."""
    rows = []
    for step in range(last_step + 1):
        reward = 0.1 + 0.01 * step + offset
        row = {"step": step, "reward_mean": reward, "reward_std": 0.1, "loss": 0.0,
               "gate_mean": 0.9, "attenuated_frac": 0.1 + offset, "ratio_max": 1.0 + 0.5 * (step // 10)}
        if step % 10 == 0:
            row["pass_at_1"] = reward / 2
        rows.append(row)
    return rows


def collapsing() -> list[dict]:
    """GRPO-like: rises 0.025 per step to 0.6 at step 20, then falls 0.07 per step to 0."""
    rows = []
    for step in range(50):
        reward = 0.1 + 0.025 * step if step <= 20 else max(0.0, 0.6 - 0.07 * (step - 20))
        row = {"step": step, "reward_mean": reward, "reward_std": 0.1, "loss": 0.0, "clip_frac": 0.05}
        if step % 10 == 0:
            row["pass_at_1"] = 0.3 if step == 20 else 0.1
        rows.append(row)
    return rows


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the table under ``## heading``, keyed by their first cell."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.fixture
def runs(tmp_path):
    return [
        write_run(tmp_path / "sapo_s1", seed=1, rows=rising(-0.02, 49)),
        write_run(tmp_path / "sapo_s2", seed=2, rows=rising(+0.02, 59)),  # ran longer
        write_run(tmp_path / "grpo", loss="grpo", seed=1, rows=collapsing()),
        write_run(tmp_path / "grpo_r2", loss="grpo", routing="r2", rows=rising(0.0, 29)),
        write_run(tmp_path / "gspo", loss="gspo", rows=[{"step": s, "reward_mean": 0.2} for s in range(5)]),
        write_run(tmp_path / "sapo_tau", tau_pos=0.5, tau_neg=2.0, rows=rising(0.0, 9)),
    ]


def test_labels_best_final_and_collapse(runs, tmp_path):
    result = compare_runs(runs, tmp_path / "out", smooth=1)
    text = result.markdown.read_text()
    by_label = table(text, "By label")
    assert list(by_label) == ["SAPO", "GRPO", "GRPO-R2", "GSPO", "SAPO (tau_pos=0.5, tau_neg=2)"]
    # columns: seeds, final reward, best reward, last-fifth reward, final Pass@1, best Pass@1, collapse of the
    # mean curve, collapsed seeds, gate mean, attenuated, clip, largest ratio
    grpo = by_label["GRPO"]
    # last fifth: steps 40..49, reward 0
    assert grpo[:8] == ["1", "0.0000 (step 49)", "0.6000 (step 20)", "0.0000 ± 0.0000", "0.1000", "0.3000 (step 20)",
                        "step 23 (reward)", "1/1"]
    assert grpo[8:] == ["n/a", "n/a", "0.0500", "n/a"]
    sapo = by_label["SAPO"]
    # Seeds averaged on the steps both logged (0..49): mean reward 0.1 + 0.01 * step. Last fifths: steps 40..49
    # of seed 1 (mean 0.08 + 0.445) and 48..59 of seed 2 (0.12 + 0.535): 0.59 ± 0.065.
    assert sapo[:8] == ["2", "0.5900 (step 49)", "0.5900 (step 49)", "0.5900 ± 0.0650", "0.2500", "0.2500 (step 40)",
                        "none", "0/2"]
    assert sapo[8:] == ["0.9000", "0.1018", "n/a", "3.5"]  # attenuated: (50 * 0.08 + 60 * 0.12) / 110
    assert by_label["GSPO"][4:8] == ["n/a", "n/a", "none", "0/1"]
    by_run = table(text, "By run")
    assert list(by_run) == ["SAPO seed 1", "SAPO seed 2", "GRPO", "GRPO-R2", "GSPO", "SAPO (tau_pos=0.5, tau_neg=2)"]
    assert by_run["SAPO seed 2"][0:5] == ["2", f"`{runs[1]}`", "0.7100 (step 59)", "0.7100 (step 59)", "0.6550"]
    assert by_run["GRPO"][7] == "step 23 (reward)" and by_run["SAPO seed 1"][7] == "none"
    assert by_run["SAPO seed 2"][-1] == "3.5" and by_run["GRPO"][-1] == "n/a"


def test_collapse_uses_the_trailing_mean(runs, tmp_path):
    # Smoothed over 3 steps the best is 0.575 (steps 18-20); the first smoothed value more than
    # 0.2 below it is (0.39 + 0.32 + 0.25) / 3 = 0.32 at step 25, and the reward never rises again.
    result = compare_runs(runs[2:3], tmp_path / "out", smooth=3)
    assert result.by_label[0].collapse == Collapse(25, "reward")
    assert compare_runs(runs[2:3], tmp_path / "out", smooth=3, collapse_drop=0.3).by_label[0].collapse_step == 26
    assert compare_runs(runs[2:3], tmp_path / "out", smooth=3, collapse_drop=0.6).by_label[0].collapse_step is None
    # It lasts to step 49, 25 steps: a hold of 26 steps is not met.
    assert compare_runs(runs[2:3], tmp_path / "out", smooth=3, hold=25).by_label[0].collapse_step == 25
    assert compare_runs(runs[2:3], tmp_path / "out", smooth=3, hold=26).by_label[0].collapse_step is None


def test_trailing_mean_and_collapse_by_hand():
    values = np.array([1.0, 3.0, 5.0, 1.0, 0.0])
    np.testing.assert_allclose(trailing_mean(values, 2), [1.0, 2.0, 4.0, 3.0, 0.5])
    steps = np.array([10, 20, 30, 40, 50])
    assert reward_collapse_step(steps, values, drop=1.5, smooth=2, hold=1) == 50  # 4.0 best, 3.0 then 0.5
    assert reward_collapse_step(steps, values, drop=1.5, smooth=1, hold=1) == 40
    assert reward_collapse_step(steps, values, drop=1.5, smooth=1, hold=2) == 40  # steps 40 and 50 stay low
    assert reward_collapse_step(steps, values, drop=1.5, smooth=1, hold=3) is None  # too short to tell
    assert reward_collapse_step(steps, values, drop=5.0, smooth=1, hold=1) is None


STEPS = np.arange(40)


def dip_then(after: float) -> np.ndarray:
    """Reward rising 0.02 per step to 0.6 at step 15, down to 0.1 for steps 16-22, then ``after``."""
    reward = np.minimum(0.3 + 0.02 * STEPS, 0.6)
    reward[16:23] = 0.1
    reward[23:] = after
    return reward


def test_a_dip_that_recovers_is_not_a_collapse():
    # The old rule (first fall of 0.2 below the best) fired at step 16 here.
    assert reward_collapse_step(STEPS, dip_then(0.55), drop=0.2, smooth=1, hold=5) is None
    # Coming back to exactly the edge of the band is a recovery (within drop of the best) ...
    assert reward_collapse_step(STEPS, dip_then(0.4 + 1e-9), drop=0.2, smooth=1, hold=5) is None
    # ... staying just below it is not.
    assert reward_collapse_step(STEPS, dip_then(0.39), drop=0.2, smooth=1, hold=5) == 16


def test_a_drop_that_stays_is_a_collapse_at_its_first_step():
    reward = np.minimum(0.3 + 0.02 * STEPS, 0.6)
    reward[30:] = 0.05
    assert reward_collapse_step(STEPS, reward, drop=0.2, smooth=1, hold=5) == 30
    # Smoothed over 3 steps, the mean first falls more than 0.2 below 0.6 at step 31: (0.6 + 0.05 + 0.05) / 3.
    assert reward_collapse_step(STEPS, reward, drop=0.2, smooth=3, hold=5) == 31
    assert reward_collapse_step(STEPS + 100, reward, drop=0.2, smooth=1, hold=5) == 130  # steps, not indices
    # A fall in the last hold - 1 steps is too short to call; at exactly hold steps it is called.
    assert reward_collapse_step(STEPS, reward, drop=0.2, smooth=1, hold=11) is None
    assert reward_collapse_step(STEPS, reward, drop=0.2, smooth=1, hold=10) == 30
    # A higher peak later is a recovery of the earlier fall: the collapse is the last fall, not the first.
    reward[10:15] = 0.0
    assert reward_collapse_step(STEPS, reward, drop=0.2, smooth=1, hold=5) == 30


def test_entropy_collapse_is_detected_and_named():
    entropy = np.where(STEPS < 20, 1.5, 0.1)  # early 1.5; 0.1 < 0.1 * 1.5 from step 20 on
    assert entropy_collapse_step(STEPS, entropy, fraction=0.1, smooth=1, hold=5) == 20
    assert entropy_collapse_step(STEPS, entropy, fraction=0.05, smooth=1, hold=5) is None
    entropy[30] = 1.0  # it comes back above the line once: it falls for good only at step 31
    assert entropy_collapse_step(STEPS, entropy, fraction=0.1, smooth=1, hold=5) == 31
    flat_reward = Curve(STEPS, np.full(40, 0.5))
    assert detect_collapse(flat_reward, Curve(STEPS, entropy), drop=0.2, smooth=1, hold=5,
                           entropy_frac=0.1) == Collapse(31, "entropy")
    assert detect_collapse(flat_reward, None, drop=0.2, smooth=1, hold=5, entropy_frac=0.1) is None
    # Both kinds: the earlier is reported.
    falling = Curve(STEPS, np.where(STEPS < 25, 0.6, 0.1))
    assert detect_collapse(falling, Curve(STEPS, entropy), 0.2, 1, 5, 0.1) == Collapse(25, "reward")
    assert detect_collapse(Curve(STEPS, np.where(STEPS < 35, 0.6, 0.1)), Curve(STEPS, entropy), 0.2, 1, 5,
                           0.1) == Collapse(31, "entropy")
    assert str(Collapse(31, "entropy")) == "step 31 (entropy)"


def test_entropy_collapse_in_the_comparison(tmp_path):
    rows = [{"step": int(s), "reward_mean": 0.5, "entropy": 1.5 if s < 20 else 0.1} for s in STEPS]
    folder = write_run(tmp_path / "sapo", rows=rows)
    result = compare_runs([folder], tmp_path / "out", smooth=1)
    assert result.by_label[0].collapse == Collapse(20, "entropy")
    assert table(result.markdown.read_text(), "By run")["SAPO"][7] == "step 20 (entropy)"
    assert compare_runs([folder], tmp_path / "out", smooth=1, entropy_frac=0.05).by_label[0].collapse is None


def test_seed_aggregation_band(runs, tmp_path):
    sapo = compare_runs(runs[:2], tmp_path / "out").by_label[0]
    steps = np.arange(50)
    np.testing.assert_array_equal(sapo.reward.steps, steps)
    np.testing.assert_allclose(sapo.reward.mean, 0.1 + 0.01 * steps, atol=1e-12)
    np.testing.assert_allclose(sapo.reward.low, 0.08 + 0.01 * steps, atol=1e-12)
    np.testing.assert_allclose(sapo.reward.high, 0.12 + 0.01 * steps, atol=1e-12)
    np.testing.assert_array_equal(sapo.pass_at_1.steps, [0, 10, 20, 30, 40])


def test_png_has_two_panels_with_a_line_per_label(runs, tmp_path):
    result = compare_runs(runs, tmp_path / "out", smooth=1)
    image = matplotlib.image.imread(result.png)
    assert image.shape == (round(FIGURE_SIZE[1] * DPI), round(FIGURE_SIZE[0] * DPI), 4)
    first_colour = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's C0, SAPO's line and band
    assert (np.abs(image[..., :3] - first_colour).max(axis=-1) < 0.02).sum() > 100
    figure = plot_comparison(result.by_label)
    reward_axes, pass_axes = figure.axes
    assert (reward_axes.get_title(), pass_axes.get_title()) == ("Training reward", "Validation Pass@1")
    labels = [row.label + (" (1/1 collapsed)" if row.label == "GRPO" else "") for row in result.by_label]
    assert reward_axes.get_legend_handles_labels()[1] == labels
    # GSPO logged no evaluation, so the Pass@1 panel has a line for the four other labels.
    assert len([line for line in pass_axes.get_lines() if not line.get_label().startswith("_")]) == 4
    assert [line.get_xdata()[0] for line in reward_axes.get_lines() if line.get_linestyle() == ":"] == [23]
    crosses = [line for line in reward_axes.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in crosses] == [[23]]  # GRPO's one seed, on its mean line
    np.testing.assert_allclose(crosses[0].get_ydata(), [0.6 - 0.07 * 3])


def test_given_labels_group_runs_as_seeds(runs, tmp_path):
    result = compare_runs([runs[0], runs[3]], tmp_path / "out", labels=["mine", "mine"])
    assert [row.label for row in result.by_label] == ["mine"] and len(result.by_label[0].runs) == 2
    assert [row.label for row in result.by_run] == ["mine seed 1", "mine seed 0"]


def test_command_line(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["compare", *map(str, runs[:3]), "--out", str(tmp_path / "cli"), "--smooth", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| GRPO | 1 | 0.0000 (step 49) | 0.6000 (step 20) |" in out
    assert (tmp_path / "cli" / "compare.png").exists() and (tmp_path / "cli" / "compare.md").exists()


def test_resumed_run_keeps_the_relogged_steps(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1} for s in range(6)] + [{"step": s, "reward_mean": 0.5} for s in range(3, 5)]
    run = read_run(write_run(tmp_path / "resumed", rows=rows))
    np.testing.assert_array_equal(run.metrics["reward_mean"].steps, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(run.metrics["reward_mean"].values, [0.1, 0.1, 0.1, 0.5, 0.5])


def test_metrics_from_tensorboard_when_there_is_no_jsonl(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    folder = write_run(tmp_path / "tb", loss="gspo")
    (folder / "metrics.jsonl").unlink()
    with SummaryWriter(folder / "tensorboard") as writer:
        for step in range(4):
            writer.add_scalar("train/reward_mean", 0.25 * step, step)
            writer.add_scalar("train/not_a_metric", 1.0, step)
        writer.add_scalar("eval/pass_at_1", 0.5, 3)
    run = read_run(folder)
    assert sorted(run.metrics) == ["pass_at_1", "reward_mean"]
    np.testing.assert_allclose(run.metrics["reward_mean"].values, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(run.metrics["pass_at_1"].steps, [3])


GOOD = '{"step": 0, "reward_mean": 0.1}\n'


@pytest.mark.parametrize(
    "text, problem",
    [
        (GOOD + GOOD.replace("0,", "1,") + '{"step": 2, "reward_mean": 0.1\n', r"line 3: invalid JSON"),
        (GOOD + '{"step": 1, "loss": 0.3}\n', r"line 2: 'reward_mean' is missing"),
        (GOOD + '{"reward_mean": 0.3}\n', r"line 2: 'step' is missing"),
        (GOOD + '{"step": "1", "reward_mean": 0.3}\n', r"line 2: 'step' must be an integer"),
        (GOOD + '{"step": 1, "reward_mean": NaN}\n', r"line 2: 'reward_mean' must be a finite number"),
        (GOOD + '{"step": 1, "reward_mean": 0.3, "clip_frac": "high"}\n', r"line 2: 'clip_frac' must be a number"),
        ("\n" + GOOD + "[1, 2]\n", r"line 3: expected a JSON object"),
        ("", r"no metrics \(the file is empty\)"),
    ],
)
def test_bad_metrics_name_the_file_and_line(tmp_path, text, problem):
    folder = write_run(tmp_path / "bad")
    (folder / "metrics.jsonl").write_text(text)
    with pytest.raises(RunFolderError, match=rf"{folder / 'metrics.jsonl'}.*{problem}"):
        read_run(folder)


def test_missing_files_and_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        read_run(tmp_path / "nowhere")
    folder = write_run(tmp_path / "nometrics")
    (folder / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"nometrics/metrics.jsonl: missing, and no TensorBoard event files"):
        read_run(folder)
    folder = write_run(tmp_path / "noconfig", rows=[{"step": 0, "reward_mean": 0.0}])
    (folder / "config.toml").unlink()
    with pytest.raises(FileNotFoundError, match=r"noconfig/config.toml: missing"):
        read_run(folder)
    (folder / "config.toml").write_text('[loss]\nname = "ppo"\n')
    with pytest.raises(RunFolderError, match=r"config.toml: loss.name = 'ppo' is not one of sapo, grpo, gspo"):
        read_run(folder)
    (folder / "config.toml").write_text('[loss\n')
    with pytest.raises(RunFolderError, match=r"config.toml: invalid TOML"):
        read_run(folder)


def test_same_label_and_seed_or_wrong_label_count_are_errors(tmp_path):
    a = write_run(tmp_path / "a", rows=rising(0.0, 3))
    b = write_run(tmp_path / "b", rows=rising(0.0, 3))
    with pytest.raises(ValueError, match=rf"{a} and {b} are both 'SAPO' with seed 0; give them different --labels"):
        compare_runs([a, b], tmp_path / "out")
    with pytest.raises(ValueError, match="--labels gives 1 labels for 2 run folders"):
        compare_runs([a, b], tmp_path / "out", labels=["x"])
    assert len(compare_runs([a, b], tmp_path / "out", labels=["x", "y"]).by_label) == 2
