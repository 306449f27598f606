"""The comparison's two outputs: a figure in the style of the paper's figure 4 and a markdown table.

The figure has two panels, training reward and validation Pass@1 against the RL step, one line
per label (the mean over its seeds) with a min-max band when it has several seeds, a dotted
vertical line at the collapse step of a label's mean curve, and a cross on the mean reward line
at each seed's own collapse step; the legend counts the collapsed seeds. It is drawn on a bare
``Figure`` with the Agg canvas, never through pyplot, so no global backend state is touched and
no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_sapo.analysis.summary import GATE_AND_CLIP_KEYS, Band, Summary

FIGURE_SIZE = (12.0, 4.5)  # inches
DPI = 120


def plot_comparison(summaries: list[Summary]) -> Figure:
    """Reward (left) and Pass@1 (right) against step, one colour per label."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    reward_axes, pass_axes = figure.subplots(1, 2)
    for index, summary in enumerate(summaries):
        colour = f"C{index % 10}"
        label = summary.label
        if summary.collapsed_runs:
            label += f" ({summary.collapsed_runs}/{len(summary.runs)} collapsed)"
        _draw(reward_axes, summary.reward, label, colour)
        if summary.pass_at_1 is not None:
            _draw(pass_axes, summary.pass_at_1, label, colour, marker="o")
        if summary.collapse_step is not None:
            reward_axes.axvline(summary.collapse_step, color=colour, linestyle=":", linewidth=1)
        crosses = [c.step for c in summary.run_collapses if c is not None]
        if crosses:
            at = np.interp(crosses, summary.reward.steps, summary.reward.mean)
            reward_axes.plot(crosses, at, linestyle="none", marker="x", markersize=8, color=colour,
                             label="_collapse")
    reward_axes.set(title="Training reward", xlabel="step", ylabel="mean reward")
    pass_axes.set(title="Validation Pass@1", xlabel="step", ylabel="Pass@1")
    if not any(summary.pass_at_1 is not None for summary in summaries):
        pass_axes.text(0.5, 0.5, "no evaluation steps in these runs", ha="center", va="center",
                       transform=pass_axes.transAxes)
    reward_axes.legend(loc="best", fontsize="small")
    for axes in (reward_axes, pass_axes):
        axes.grid(alpha=0.3)
    return figure


def _draw(axes, band: Band, label: str, colour: str, marker: str | None = None) -> None:
    axes.plot(band.steps, band.mean, color=colour, label=label, marker=marker, markersize=3)
    if (band.high > band.low).any():
        axes.fill_between(band.steps, band.low, band.high, color=colour, alpha=0.2, linewidth=0)


def write_png(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _at_step(value: tuple[float, int] | None) -> str:
    return "n/a" if value is None else f"{value[0]:.4f} (step {value[1]})"


def markdown(label_rows: list[Summary], run_rows: list[Summary], collapse_drop: float, smooth: int, hold: int,
             entropy_frac: float) -> str:
    """Per-label table (means over seeds), then per-run table, with how collapse was measured."""
    stats = [key.replace("_", " ") for key in GATE_AND_CLIP_KEYS]
    header = ["label", "seeds", "final reward", "best reward", "last-fifth reward (mean ± std over seeds)",
              "final Pass@1", "best Pass@1", "collapse (mean curve)", "collapsed seeds", *stats, "largest ratio"]
    lines = [
        "# Run comparison",
        "",
        f"Collapse, on curves smoothed by a trailing mean over {smooth} steps: \"reward\" when the reward falls "
        f"more than {collapse_drop:g} below its best so far and never comes back within {collapse_drop:g} of it; "
        f"\"entropy\" when the entropy falls below {entropy_frac:g} of its early value (its first {smooth} steps) "
        f"and stays below; either must last at least {hold} steps to the end of the run. The first step of "
        "either kind is given. Labels with several seeds: means over the seeds, on the steps all of them logged; "
        "last-fifth reward: each seed's mean over its last fifth of steps, then mean ± standard deviation over "
        "seeds. Gate and clip columns: means over every logged step; largest ratio: the largest token ratio "
        "any update logged.",
        "",
        "## By label",
        "",
        *_table(header, [_label_row(row) for row in label_rows]),
        "",
        "## By run",
        "",
        *_table(["run", "seed", "folder", "final reward", "best reward", "last-fifth reward", "final Pass@1",
                 "best Pass@1", "collapse", *stats, "largest ratio"], [_run_row(row) for row in run_rows]),
        "",
    ]
    return "\n".join(lines)


def _label_row(row: Summary) -> list[str]:
    mean, std = row.tail_reward
    return [row.label, str(len(row.runs)), f"{row.final_reward:.4f} (step {int(row.reward.steps[-1])})",
            _at_step(row.best_reward), f"{mean:.4f} ± {std:.4f}", _number(row.final_pass_at_1),
            _at_step(row.best_pass_at_1), _collapse(row.collapse), f"{row.collapsed_runs}/{len(row.runs)}",
            *(_number(row.gate_and_clip[key]) for key in GATE_AND_CLIP_KEYS), _ratio(row.ratio_max)]


def _run_row(row: Summary) -> list[str]:
    (run,) = row.runs
    return [row.label, str(run.seed), f"`{run.path}`", f"{row.final_reward:.4f} (step {int(row.reward.steps[-1])})",
            _at_step(row.best_reward), f"{row.tail_reward[0]:.4f}", _number(row.final_pass_at_1),
            _at_step(row.best_pass_at_1), _collapse(row.run_collapses[0]),
            *(_number(row.gate_and_clip[key]) for key in GATE_AND_CLIP_KEYS), _ratio(row.ratio_max)]


def _collapse(collapse) -> str:
    return "none" if collapse is None else str(collapse)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
    return ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in escape[1:])]
