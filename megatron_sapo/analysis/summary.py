"""From runs to what a comparison reports: labels, seed aggregation, collapse, summary numbers.

Runs are labelled by algorithm (SAPO, GSPO, GRPO, GRPO-R2, GRPO-R3; SAPO runs whose gate
temperatures differ from the defaults carry them), or by labels the user gives. Runs sharing a
label are seeds of one configuration: their curves are averaged on the steps every one of them
logged (so the mean never mixes different sets of runs), with the minimum and maximum as a
band. A run's collapse is the first step where its reward, averaged over the trailing
``smooth`` steps (trailing, so a step is judged by what came before it), falls more than
``collapse_drop`` (in reward units) below the best smoothed reward seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_sapo.analysis.runs import PASS_AT_1, REWARD, Curve, Run
from megatron_sapo.config import LossConfig
from megatron_sapo.errors import InputError

# Per-step statistics whose mean over the run is reported: SAPO's gate, GRPO/GSPO's clipping.
GATE_AND_CLIP_KEYS: tuple[str, ...] = ("gate_mean", "attenuated_frac", "clip_frac")


def default_label(run: Run) -> str:
    """SAPO / GSPO / GRPO, "-R2"/"-R3" with routing replay, and SAPO's temperatures when not the defaults."""
    label = run.loss.upper()
    if run.routing_replay != "none":
        label += "-" + run.routing_replay.upper()
    if run.loss == "sapo" and (run.tau_pos, run.tau_neg) != (LossConfig.tau_pos, LossConfig.tau_neg):
        label += f" (tau_pos={run.tau_pos:g}, tau_neg={run.tau_neg:g})"
    return label


@dataclass(frozen=True)
class Band:
    """A metric averaged over the runs of one label, on the steps all of them logged."""

    steps: np.ndarray
    """int64 ``[S]``."""
    mean: np.ndarray
    """float64 ``[S]``: mean over runs."""
    low: np.ndarray
    """float64 ``[S]``: minimum over runs."""
    high: np.ndarray
    """float64 ``[S]``: maximum over runs."""


def aggregate(curves: list[Curve]) -> Band | None:
    """Mean, min and max of ``curves`` on their common steps; None when they share no step."""
    steps = curves[0].steps
    for curve in curves[1:]:
        steps = np.intersect1d(steps, curve.steps)
    if steps.size == 0:
        return None
    stacked = np.stack([curve.values[np.searchsorted(curve.steps, steps)] for curve in curves])
    return Band(steps, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0))


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def collapse_step(steps: np.ndarray, reward: np.ndarray, drop: float, smooth: int) -> int | None:
    """First step whose smoothed reward is more than ``drop`` below the running best; None if none."""
    smoothed = trailing_mean(reward, smooth)
    fallen = np.nonzero(np.maximum.accumulate(smoothed) - smoothed > drop)[0]
    return int(steps[fallen[0]]) if fallen.size else None


@dataclass(frozen=True)
class Summary:
    """The numbers of one row of the comparison table (one label, or one run)."""

    label: str
    """Row name."""
    runs: tuple[Run, ...]
    """The runs averaged into this row."""
    reward: Band
    """Training reward (``reward_mean``) over steps."""
    pass_at_1: Band | None
    """Validation Pass@1 at evaluation steps; None without evaluations common to all runs."""
    collapse_step: int | None
    """First step of collapse (see the module docstring); None if the reward never collapsed."""
    gate_and_clip: dict[str, float | None]
    """Mean of each of ``GATE_AND_CLIP_KEYS`` over all logged steps of all runs (None: not logged)."""

    @property
    def final_reward(self) -> float:
        return float(self.reward.mean[-1])

    @property
    def best_reward(self) -> tuple[float, int]:
        """Best mean reward and its step (the first, on ties)."""
        index = int(np.argmax(self.reward.mean))
        return float(self.reward.mean[index]), int(self.reward.steps[index])

    @property
    def final_pass_at_1(self) -> float | None:
        return None if self.pass_at_1 is None else float(self.pass_at_1.mean[-1])

    @property
    def best_pass_at_1(self) -> tuple[float, int] | None:
        if self.pass_at_1 is None:
            return None
        index = int(np.argmax(self.pass_at_1.mean))
        return float(self.pass_at_1.mean[index]), int(self.pass_at_1.steps[index])


def summarize(label: str, runs: list[Run], collapse_drop: float, smooth: int) -> Summary:
    """One row from ``runs`` (seeds of one configuration, or a single run)."""
    reward = aggregate([run.metrics[REWARD] for run in runs])
    if reward is None:
        folders = ", ".join(str(run.path) for run in runs)
        raise InputError(f"{label}: the runs {folders} share no logged step, so their rewards cannot be averaged")
    with_eval = [run.metrics[PASS_AT_1] for run in runs if PASS_AT_1 in run.metrics]
    pass_at_1 = aggregate(with_eval) if len(with_eval) == len(runs) else None
    return Summary(
        label=label,
        runs=tuple(runs),
        reward=reward,
        pass_at_1=pass_at_1,
        collapse_step=collapse_step(reward.steps, reward.mean, collapse_drop, smooth),
        gate_and_clip={key: _mean_over_runs(runs, key) for key in GATE_AND_CLIP_KEYS},
    )


def _mean_over_runs(runs: list[Run], key: str) -> float | None:
    values = [run.metrics[key].values for run in runs if key in run.metrics]
    return float(np.concatenate(values).mean()) if values else None


def group_by_label(runs: list[Run], labels: list[str] | None = None) -> dict[str, list[Run]]:
    """Runs under their labels (given, or ``default_label``), in order of first appearance.

    Two runs with the same label and the same seed cannot be seeds of one configuration: that
    is an error naming both folders (give them different ``labels``)."""
    if labels is not None and len(labels) != len(runs):
        raise InputError(f"--labels gives {len(labels)} labels for {len(runs)} run folders")
    groups: dict[str, list[Run]] = {}
    for run, label in zip(runs, labels or [default_label(run) for run in runs]):
        twin = next((other for other in groups.get(label, []) if other.seed == run.seed), None)
        if twin is not None:
            raise InputError(f"{twin.path} and {run.path} are both {label!r} with seed {run.seed}; "
                             "give them different --labels to compare them")
        groups.setdefault(label, []).append(run)
    return groups
