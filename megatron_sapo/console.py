"""What ``megatron-sapo train`` shows on the console: a short header before the run, then the
progress bar, then a summary with the path of a reward / Pass@1 curve it writes into the run
folder; and the library warnings known to be harmless, filtered in one place.

Every process applies the same filters (:func:`quiet_known_warnings` runs first in the command
and in every rank), so none of those warnings is printed, let alone once per rank. Anything not
listed here is shown as the library wrote it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from megatron_sapo.config import RunConfig

KNOWN_HARMLESS = (
    # Megatron-Core on a machine without Apex or TransformerEngine falls back to torch modules,
    # which is what the local layer spec means to do.
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    r".*TransformerEngine.* not available",
    r"Transformer Engine and Apex are not installed",
    # Megatron reads these for NCCL / CUDA overlap; gloo on CPU has nothing to overlap.
    r".*CUDA_DEVICE_MAX_CONNECTIONS",
    # torch's notices about APIs Megatron-Core 0.16 still calls.
    r".*reduce_scatter_tensor.* is deprecated",
    r".*_reduce_scatter_base.* is deprecated",
    r".*_all_gather_base.* is deprecated",
    r".*torch\.distributed\..* is deprecated",
    r".*The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    r".*deprecated.*scope",
)


QUIET_LOGGERS = ("megatron.core.rerun_state_machine",)
"""Loggers whose warnings are notices (Megatron announcing its rerun state machine's mode)."""


def quiet_known_warnings() -> None:
    """Ignore the warnings of ``KNOWN_HARMLESS`` and the notices of ``QUIET_LOGGERS`` in this
    process, and the progress bars transformers draws while the start model is saved (spawned
    ranks inherit the environment variable)."""
    for pattern in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def header(cfg: RunConfig, world: int, out_dir: Path) -> str:
    """Model, layout, rollout servers, algorithm and outputs, before anything starts."""
    model = cfg.model.hf_dir or f"built-in {cfg.model.builtin}"
    p = cfg.parallel
    dp = cfg.parallel.data_parallel_size(world)
    servers = (f"{cfg.rollout.num_servers} colocated SGLang server(s)" if cfg.rollout.mode == "colocated"
               else f"{len(cfg.rollout.servers)} SGLang server(s) at {', '.join(cfg.rollout.servers)}")
    loss = cfg.loss
    algorithm = loss.name.upper()
    if loss.name == "sapo":
        algorithm += f" (tau_pos {loss.tau_pos}, tau_neg {loss.tau_neg})"
    if cfg.train.replays_routes:
        algorithm += f" with routing replay {cfg.train.routing_replay.upper()}"
    return "\n".join([
        f"model     {model} ({cfg.model.params_dtype})",
        f"layout    {world} rank(s): TP{p.tp} PP{p.pp} EP{p.ep}, {dp} data-parallel replica(s)",
        f"rollout   {servers}, {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples per step",
        f"algorithm {algorithm}, {cfg.train.steps} steps of {cfg.train.minibatches} updates",
        f"outputs   {out_dir} (metrics.jsonl, tensorboard/, checkpoints/, curves.png)",
    ])


def summary(out_dir: Path, seconds: float) -> str:
    """Reward of the first and last fifth of the run, Pass@1 at its first and last evaluation,
    the time, and the curve written to ``out_dir/curves.png``."""
    from megatron_sapo.analysis.runs import read_metrics_jsonl

    minutes, rest = divmod(round(seconds), 60)
    took = f"time      {minutes} min {rest:02d} s"
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        return f"{took} (no steps in {metrics})"
    curves = read_metrics_jsonl(metrics)
    lines = []
    reward = curves.get("reward_mean")
    if reward is not None:
        fifth = max(1, len(reward.values) // 5)
        lines.append(f"reward    {reward.values[:fifth].mean():.3f} (first fifth of {len(reward.values)} steps) -> "
                     f"{reward.values[-fifth:].mean():.3f} (last fifth)")
    passed = curves.get("pass_at_1")
    if passed is not None:
        lines.append(f"Pass@1    {passed.values[0]:.3f} (step {passed.steps[0]}) -> {passed.values[-1]:.3f} "
                     f"(step {passed.steps[-1]})")
    lines.append(took)
    lines.append(f"curve     {write_curve(out_dir, curves)}")
    return "\n".join(lines)


def write_curve(out_dir: Path, curves: dict) -> Path:
    """Reward and Pass@1 against the step, as ``out_dir/curves.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    reward_axes, pass_axes = figure.subplots(1, 2)
    if "reward_mean" in curves:
        reward_axes.plot(curves["reward_mean"].steps, curves["reward_mean"].values)
    if "pass_at_1" in curves:
        pass_axes.plot(curves["pass_at_1"].steps, curves["pass_at_1"].values, marker="o")
    else:
        pass_axes.text(0.5, 0.5, "no evaluation steps", ha="center", va="center", transform=pass_axes.transAxes)
    reward_axes.set(title="Training reward", xlabel="step", ylabel="mean reward")
    pass_axes.set(title="Validation Pass@1", xlabel="step", ylabel="Pass@1")
    for axes in (reward_axes, pass_axes):
        axes.grid(alpha=0.3)
    path = out_dir / "curves.png"
    figure.savefig(path, format="png")
    return path


__all__ = ["KNOWN_HARMLESS", "QUIET_LOGGERS", "header", "quiet_known_warnings", "summary", "write_curve"]
