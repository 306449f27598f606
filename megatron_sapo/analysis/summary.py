"""From runs to what a comparison reports: labels, seed aggregation, collapse, summary numbers.

Runs are labelled by algorithm (SAPO, GSPO, GRPO, GRPO-R2, GRPO-R3; SAPO runs whose gate
temperatures differ from the defaults carry them), or by labels the user gives. Runs sharing a
label are seeds of one configuration: their curves are averaged on the steps every one of them
logged (so the mean never mixes different sets of runs), with the minimum and maximum as a
band.

Collapse (``detect_collapse``) is judged on a curve smoothed by a trailing mean over ``smooth``
logged steps (trailing, so a step is judged by what came before it), of one of two kinds:

* "reward": at step t the smoothed reward is more than ``drop`` below the best smoothed reward
  up to t, *and stays there*: no later smoothed value comes back within ``drop`` of that best,
  up to the end of the run, and at least ``hold`` logged steps (t included) remain. A dip that
  recovers is not a collapse, nor is a fall in the last ``hold - 1`` steps (too short to tell).
* "entropy": the smoothed policy entropy (``entropy``, the mean per-token entropy the loss
  logs) falls below ``entropy_frac`` of its early value (the mean of its first ``smooth``
  logged values) and stays below it to the end of the run, again for at least ``hold`` steps.
  A policy that has learned a task well is also nearly deterministic, so read this kind with
  the reward: it flags the policy ceasing to explore, whatever the reward does.

The collapse step is the first t of either kind (on a tie, "reward"). A label's row reports
each of its seeds' collapses (``run_collapses``), and the collapse of its mean curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_sapo.analysis.runs import ENTROPY, PASS_AT_1, RATIO_MAX, REWARD, Curve, Run
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


CollapseKind = Literal["reward", "entropy"]


@dataclass(frozen=True)
class Collapse:
    """Where and how a run collapsed."""

    step: int
    """The first step of the collapse."""
    kind: CollapseKind
    """"reward" (fell and stayed ``drop`` below its best) or "entropy" (fell and stayed below
    ``entropy_frac`` of its early value)."""

    def __str__(self) -> str:
        return f"step {self.step} ({self.kind})"


def reward_collapse_step(steps: np.ndarray, reward: np.ndarray, drop: float, smooth: int, hold: int) -> int | None:
    """First step whose smoothed reward is more than ``drop`` below the best smoothed reward so
    far and never comes back within ``drop`` of that best, with ``hold`` or more steps left
    (that one included); None if none."""
    smoothed = trailing_mean(reward, smooth)
    best_so_far = np.maximum.accumulate(smoothed)
    best_from_here = np.maximum.accumulate(smoothed[::-1])[::-1]  # the highest value at or after each step
    steps_left = np.arange(smoothed.size, 0, -1)
    fallen = np.nonzero((best_so_far - best_from_here > drop) & (steps_left >= hold))[0]
    return int(steps[fallen[0]]) if fallen.size else None


def entropy_collapse_step(steps: np.ndarray, entropy: np.ndarray, fraction: float, smooth: int,
                          hold: int) -> int | None:
    """First step whose smoothed entropy is below ``fraction`` of the mean of the first
    ``smooth`` values and stays below it to the end, with ``hold`` or more steps left; None if
    none (or if the early entropy is not positive)."""
    early = float(entropy[:smooth].mean())
    if not early > 0:
        return None
    smoothed = trailing_mean(entropy, smooth)
    highest_from_here = np.maximum.accumulate(smoothed[::-1])[::-1]
    steps_left = np.arange(smoothed.size, 0, -1)
    fallen = np.nonzero((highest_from_here < fraction * early) & (steps_left >= hold))[0]
    return int(steps[fallen[0]]) if fallen.size else None


def detect_collapse(reward: Curve, entropy: Curve | None, drop: float, smooth: int, hold: int,
                    entropy_frac: float) -> Collapse | None:
    """The earlier of a reward and an entropy collapse (see the module docstring); None if neither."""
    found = []
    step = reward_collapse_step(reward.steps, reward.values, drop, smooth, hold)
    if step is not None:
        found.append(Collapse(step, "reward"))
    if entropy is not None and entropy.steps.size:
        step = entropy_collapse_step(entropy.steps, entropy.values, entropy_frac, smooth, hold)
        if step is not None:
            found.append(Collapse(step, "entropy"))
    return min(found, key=lambda c: c.step) if found else None  # min keeps the first on ties: "reward"


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
    collapse: Collapse | None
    """Collapse of this row's reward (mean over its runs) and entropy (likewise); None if none."""
    run_collapses: tuple[Collapse | None, ...]
    """Collapse of each run of ``runs``, judged on that run's own curves."""
    gate_and_clip: dict[str, float | None]
    """Mean of each of ``GATE_AND_CLIP_KEYS`` over all logged steps of all runs (None: not logged)."""
    ratio_max: float | None
    """The largest token ratio any update of any run logged (``ratio_max``; None: not logged)."""
    tail_reward: tuple[float, float]
    """Mean and standard deviation over the runs of each run's mean reward over its last fifth
    of logged steps (at least one step)."""

    @property
    def collapse_step(self) -> int | None:
        return None if self.collapse is None else self.collapse.step

    @property
    def collapsed_runs(self) -> int:
        return sum(c is not None for c in self.run_collapses)

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


def summarize(label: str, runs: list[Run], collapse_drop: float, smooth: int, hold: int,
              entropy_frac: float) -> Summary:
    """One row from ``runs`` (seeds of one configuration, or a single run)."""
    reward = aggregate([run.metrics[REWARD] for run in runs])
    if reward is None:
        folders = ", ".join(str(run.path) for run in runs)
        raise InputError(f"{label}: the runs {folders} share no logged step, so their rewards cannot be averaged")
    with_eval = [run.metrics[PASS_AT_1] for run in runs if PASS_AT_1 in run.metrics]
    pass_at_1 = aggregate(with_eval) if len(with_eval) == len(runs) else None
    with_entropy = [run.metrics[ENTROPY] for run in runs if ENTROPY in run.metrics]
    entropy = aggregate(with_entropy) if len(with_entropy) == len(runs) else None
    collapse = detect_collapse(Curve(reward.steps, reward.mean),
                               None if entropy is None else Curve(entropy.steps, entropy.mean),
                               collapse_drop, smooth, hold, entropy_frac)
    ratios = [run.metrics[RATIO_MAX].values.max() for run in runs if RATIO_MAX in run.metrics]
    tails = [tail_mean(run.metrics[REWARD].values) for run in runs]
    return Summary(
        label=label,
        runs=tuple(runs),
        reward=reward,
        pass_at_1=pass_at_1,
        collapse=collapse,
        run_collapses=tuple(detect_collapse(run.metrics[REWARD], run.metrics.get(ENTROPY), collapse_drop, smooth,
                                            hold, entropy_frac) for run in runs),
        gate_and_clip={key: _mean_over_runs(runs, key) for key in GATE_AND_CLIP_KEYS},
        ratio_max=float(max(ratios)) if ratios else None,
        tail_reward=(float(np.mean(tails)), float(np.std(tails))),
    )


def tail_mean(values: np.ndarray) -> float:
    """Mean of the last fifth of ``values`` (at least one)."""
    return float(values[-max(1, values.size // 5):].mean())


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
