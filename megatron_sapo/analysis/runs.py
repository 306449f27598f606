"""Reading a finished (or running) training run's folder: what was trained, and its metrics.

A run folder holds ``config.toml`` (the resolved run config) and ``metrics.jsonl``: one JSON
object per RL step with ``step`` and ``reward_mean`` always, and any of ``METRIC_KEYS`` when
logged (``pass_at_1`` only on evaluation steps). Other keys are ignored, so the trainer can log
more without breaking comparisons. A resumed run re-logs the steps after its checkpoint: a step
number that goes back drops every earlier line from that step on. Without ``metrics.jsonl``
the TensorBoard events under ``tensorboard/`` (or the folder itself) are read instead, each
scalar tag named by its last path component (``train/reward_mean`` -> ``reward_mean``).

Only the config keys that tell runs apart are read (``loss.name``, ``loss.tau_pos``,
``loss.tau_neg``, ``train.routing_replay``, ``train.seed``), with ``megatron_sapo.config``'s
defaults, so runs written by an older config schema still compare. Errors name the folder,
the file and the line.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_sapo.config import LOSS_NAMES, ROUTING_REPLAY_MODES, LossConfig, TrainConfig
from megatron_sapo.errors import InputError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

REWARD = "reward_mean"
PASS_AT_1 = "pass_at_1"
ENTROPY = "entropy"
RATIO_MAX = "ratio_max"
METRIC_KEYS: tuple[str, ...] = (
    REWARD, "reward_std", "loss", PASS_AT_1, "gate_mean", "attenuated_frac", "clip_frac", ENTROPY, "kl_old",
    "grad_norm", "response_length_mean", "logprob_mismatch", "replay_agreement", RATIO_MAX,
)


class RunFolderError(InputError):
    """A run folder's config or metrics cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Curve:
    """One metric of one run: values at the steps where it was logged, steps increasing."""

    steps: np.ndarray
    """Step numbers, int64 ``[S]``, strictly increasing."""
    values: np.ndarray
    """Finite values, float64 ``[S]``."""


@dataclass(frozen=True, eq=False)  # identity: comparing runs by their metric arrays means nothing
class Run:
    """One training run as the comparison sees it."""

    path: Path
    """The run folder."""
    loss: str
    """``loss.name``: "sapo", "grpo" or "gspo"."""
    tau_pos: float
    """``loss.tau_pos`` (SAPO's gate temperature for positive advantages)."""
    tau_neg: float
    """``loss.tau_neg``."""
    routing_replay: str
    """``train.routing_replay``: "none", "r2" or "r3"."""
    seed: int
    """``train.seed``."""
    metrics: dict[str, Curve] = field(repr=False)
    """Every metric of ``METRIC_KEYS`` the run logged at least once (always ``reward_mean``)."""

    def curve(self, key: str) -> Curve | None:
        return self.metrics.get(key)


def read_run(path: str | Path) -> Run:
    """The run in folder ``path``: its config and its metrics (metrics.jsonl, else TensorBoard)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    settings = _read_settings(path / CONFIG_FILE)
    metrics_file = path / METRICS_FILE
    if metrics_file.exists():
        metrics = read_metrics_jsonl(metrics_file)
    else:
        metrics = _read_tensorboard(path)
    return Run(path=path, metrics=metrics, **settings)


def _read_settings(config_file: Path) -> dict:
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing (a run folder holds the resolved {CONFIG_FILE})")
    try:
        raw = tomllib.loads(config_file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RunFolderError(f"{config_file}: invalid TOML: {err}") from None
    loss, train = raw.get("loss", {}), raw.get("train", {})
    if not isinstance(loss, dict) or "name" not in loss:
        raise RunFolderError(f"{config_file}: [loss] name is missing")
    number = (int, float)
    settings = {
        "loss": _setting(config_file, "loss.name", loss["name"], str),
        "tau_pos": float(_setting(config_file, "loss.tau_pos", loss.get("tau_pos", LossConfig.tau_pos), number)),
        "tau_neg": float(_setting(config_file, "loss.tau_neg", loss.get("tau_neg", LossConfig.tau_neg), number)),
        "routing_replay": _setting(config_file, "train.routing_replay",
                                   train.get("routing_replay", TrainConfig.routing_replay), str),
        "seed": _setting(config_file, "train.seed", train.get("seed", TrainConfig.seed), int),
    }
    for key, choices in (("loss", LOSS_NAMES), ("routing_replay", ROUTING_REPLAY_MODES)):
        if settings[key] not in choices:
            where = "loss.name" if key == "loss" else "train.routing_replay"
            raise RunFolderError(f"{config_file}: {where} = {settings[key]!r} is not one of {', '.join(choices)}")
    return settings


def _setting(config_file: Path, key: str, value: object, kind: type | tuple[type, ...]):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RunFolderError(f"{config_file}: {key} = {value!r} has the wrong type")
    return value


def read_metrics_jsonl(metrics_file: Path) -> dict[str, Curve]:
    """Curves of ``metrics_file``; errors name the file and the 1-based line."""
    rows: list[tuple[int, dict[str, float]]] = []
    with open(metrics_file) as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                step, values = _parse_line(line, f"{metrics_file} line {number}")
                while rows and rows[-1][0] >= step:  # a resumed run logs these steps again
                    rows.pop()
                rows.append((step, values))
    if not rows:
        raise RunFolderError(f"{metrics_file}: no metrics (the file is empty)")
    return _curves(rows)


def _parse_line(line: str, where: str) -> tuple[int, dict[str, float]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise RunFolderError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("step", REWARD):
        if key not in record:
            raise RunFolderError(f"{where}: {key!r} is missing")
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunFolderError(f"{where}: 'step' must be an integer >= 0, got {step!r}")
    values = {}
    for key in METRIC_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFolderError(f"{where}: {key!r} must be a number, got {value!r}")
        if math.isfinite(value):  # a diverged step may log nan; it is left out of the curve
            values[key] = float(value)
    if REWARD not in values:
        raise RunFolderError(f"{where}: {REWARD!r} must be a finite number, got {record[REWARD]!r}")
    return step, values


def _curves(rows: list[tuple[int, dict[str, float]]]) -> dict[str, Curve]:
    curves = {}
    for key in METRIC_KEYS:
        points = [(step, values[key]) for step, values in rows if key in values]
        if points:
            steps, values = zip(*points)
            curves[key] = Curve(np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
    return curves


def _read_tensorboard(path: Path) -> dict[str, Curve]:
    event_dir = path / TENSORBOARD_DIR if (path / TENSORBOARD_DIR).is_dir() else path
    if not any(event_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(
            f"{path / METRICS_FILE}: missing, and no TensorBoard event files in {event_dir} to read instead")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    tags: dict[str, str] = {}
    for tag in events.Tags()["scalars"]:
        key = tag.rsplit("/", 1)[-1]
        if key in METRIC_KEYS:
            if key in tags:
                raise RunFolderError(f"{event_dir}: TensorBoard tags {tags[key]!r} and {tag!r} both give {key!r}")
            tags[key] = tag
    if REWARD not in tags:
        known = sorted(events.Tags()["scalars"])
        raise RunFolderError(f"{event_dir}: no TensorBoard scalar named {REWARD!r} (tags: {known})")
    curves = {}
    for key, tag in tags.items():
        by_step = {e.step: e.value for e in events.Scalars(tag) if math.isfinite(e.value)}  # last write wins
        if by_step:
            steps = sorted(by_step)
            curves[key] = Curve(np.asarray(steps, dtype=np.int64), np.asarray([by_step[s] for s in steps]))
    return curves
