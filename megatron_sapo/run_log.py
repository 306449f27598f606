"""Where a training run reports: ``metrics.jsonl``, TensorBoard and the console (rank 0 only).

Every step writes one JSON object (``step``, ``reward_mean``, ``loss`` and the rest) to
``metrics.jsonl``, the same scalars to TensorBoard under ``train/``, ``eval/``, ``time/`` and
``rollout/`` tags, and histograms (token ratios, per-sequence log-ratio variance, the SAPO gate
gap ``D_i`` and its bound) when given. A resumed run first drops the lines of steps after the
checkpoint it resumed from, so the file always describes one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# TensorBoard tag group of each metric (by name prefix); the rest go under "train/".
_GROUPS = (("eval_", "eval"), ("pass_at", "eval"), ("time_", "time"), ("tokens_per_s", "time"),
           ("reward", "rollout"), ("response_", "rollout"), ("logprob_mismatch", "rollout"),
           ("reward_errors", "rollout"), ("reward_timeouts", "rollout"), ("rollout_", "rollout"))


def _group(name: str) -> str:
    return next((group for prefix, group in _GROUPS if name.startswith(prefix)), "train")


class RunLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in clean.items():
                self._writer.add_scalar(f"{_group(name)}/{name}", value, step)

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        if self._writer is not None:
            for name, tensor in values.items():
                if tensor.numel():
                    self._writer.add_histogram(f"diagnostics/{name}", tensor.float(), step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
