"""The gate diagnostics a run stores at its histogram steps, read by `megatron-sapo diagnose`.

At every ``logging.histogram_every``-th step the trainer recomputes the log-probs of the step's
rows after its updates, and each data-parallel replica (its tensor and pipeline rank 0) turns its
rows into :class:`~megatron_sapo.algo.diagnostics.GateRecords`: every response token's ratio
``r_it`` and every sequence's ``Var_i``, ``D_i`` and bound, each with whether the objective's gate
engaged there. Nothing per token leaves the replica but a sample:

* the replicas all-gather 4 integers each (tokens, sequences, engaged tokens, engaged sequences),
  which give the step's exact counts and split the budgets ``logging.diagnostics_tokens`` and
  ``logging.diagnostics_sequences`` over the replicas in proportion to what each holds;
* each replica draws its share uniformly without replacement, seeded by (``train.seed``, step,
  replica), so a resumed run draws the same sample, and sends it to rank 0;
* rank 0 writes ``<out_dir>/diagnostics/step_<step>.pt`` (one file per histogram step,
  replaced when a resumed run reaches that step again) and TensorBoard histograms of the same
  sample.

Size bound: a step's file holds at most ``diagnostics_tokens * TOKEN_BYTES`` (6) plus
``diagnostics_sequences * SEQUENCE_BYTES`` (26) bytes of samples, plus at most
``FILE_OVERHEAD_BYTES`` of container and settings: 499,712 + 32,768 bytes (under 520 KiB) at the
defaults, however large the step. A replica sends its proportional share of that, about
``1 / dp`` of it (Qwen3-30B-A3B at 1,024 responses and DP 8: 8,192 tokens and all its 128
sequences, about 51 KiB); the exact counts are 32 bytes per replica.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo.algo.diagnostics import SEQUENCE_BYTES, TOKEN_BYTES, GateRecords, replica_quotas
from megatron_sapo.config import LossConfig
from megatron_sapo.errors import InputError
from megatron_sapo.parallel.collectives import all_gather_list, comm_device

FOLDER = "diagnostics"
"""The folder of a run that holds the diagnostics files."""
FILE_OVERHEAD_BYTES = 32 * 1024
"""Bound on what a file holds besides its samples (zip container, tensor headers, settings)."""
FORMAT = 1
LOSS_SETTINGS: tuple[str, ...] = ("name", "tau_pos", "tau_neg", "eps_low", "eps_high", "dual_clip_c",
                                  "logratio_clamp")
"""The ``LossConfig`` fields stored with each step: what the engaged flags were computed with."""
_FILE = re.compile(r"step_(\d+)\.pt")

_DTYPES = {"token_ratio": torch.float32, "token_advantage_sign": torch.int8, "token_engaged": torch.bool,
           "seq_log_ratio_var": torch.float32, "seq_gate_gap": torch.float32, "seq_gap_bound": torch.float32,
           "seq_tau": torch.float32, "seq_ratio": torch.float32, "seq_length": torch.int32,
           "seq_advantage_sign": torch.int8, "seq_engaged": torch.bool}
_COUNTS = ("tokens", "sequences", "tokens_engaged", "sequences_engaged")


def size_bound(tokens: int, sequences: int) -> int:
    """Most bytes a step's file takes with budgets of ``tokens`` and ``sequences``."""
    return tokens * TOKEN_BYTES + sequences * SEQUENCE_BYTES + FILE_OVERHEAD_BYTES


def step_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step_{step:010d}.pt"


def stored_steps(run_dir: Path) -> dict[int, Path]:
    """The steps with a diagnostics file in ``run_dir``, in order, and their files."""
    folder = Path(run_dir) / FOLDER
    found = {int(m.group(1)): path for path in folder.glob("step_*.pt") if (m := _FILE.fullmatch(path.name))}
    return dict(sorted(found.items()))


def drop_after(run_dir: Path, step: int) -> None:
    """Delete the files of steps after ``step``: a run resumed from there describes one run."""
    for stored, path in stored_steps(run_dir).items():
        if stored > step:
            path.unlink()


@dataclass
class StepDiagnostics:
    """One histogram step of a run: exact counts over every replica, and the stored sample."""

    step: int
    loss: dict[str, object]
    """The loss settings of ``LOSS_SETTINGS`` (``name``: "sapo", "grpo" or "gspo")."""
    tokens: int
    """Response tokens in the loss, over every replica."""
    sequences: int
    """Sequences with response tokens in the loss."""
    tokens_engaged: int
    """Of those tokens, the ones where the gate engaged (``algo.diagnostics.gate_engaged``)."""
    sequences_engaged: int
    """Of those sequences, the ones with at least one engaged token."""
    sample: GateRecords
    """A uniform random sample of the tokens and (independently) of the sequences."""

    def save(self, path: Path) -> None:
        """Write to ``path`` (through a temporary file: a crash leaves no half-written file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "step": self.step, "loss": dict(self.loss),
                   "counts": {key: getattr(self, key) for key in _COUNTS},
                   "sample": {name: value.contiguous() for name, value in self.sample.as_dict().items()}}
        partial = path.with_name(path.name + ".partial")
        torch.save(payload, partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> "StepDiagnostics":
        """Read a file written by :meth:`save`; an unreadable or malformed one is an ``InputError``
        naming it and the field at fault."""
        try:
            payload = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise InputError(f"{path}: not a diagnostics file ({type(err).__name__}: {err})") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError(f"{path}: not a diagnostics file of format {FORMAT}")
        loss, counts, sample = payload.get("loss"), payload.get("counts"), payload.get("sample")
        if not isinstance(payload.get("step"), int):
            raise InputError(f"{path}: 'step' must be an integer")
        if not isinstance(loss, dict) or set(loss) != set(LOSS_SETTINGS):
            raise InputError(f"{path}: 'loss' must hold {', '.join(LOSS_SETTINGS)}")
        if not isinstance(counts, dict) or any(not isinstance(counts.get(key), int) for key in _COUNTS):
            raise InputError(f"{path}: 'counts' must hold the integers {', '.join(_COUNTS)}")
        if not isinstance(sample, dict) or set(sample) != set(_DTYPES):
            raise InputError(f"{path}: 'sample' must hold the tensors {', '.join(_DTYPES)}")
        for name, dtype in _DTYPES.items():
            value = sample[name]
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
                raise InputError(f"{path}: sample '{name}' must be a 1-d {dtype} tensor")
        for prefix in ("token_", "seq_"):
            if len({sample[name].numel() for name in _DTYPES if name.startswith(prefix)}) != 1:
                raise InputError(f"{path}: the sample's '{prefix}*' tensors differ in length")
        return cls(step=payload["step"], loss=loss, **{key: counts[key] for key in _COUNTS},
                   sample=GateRecords(**sample))

    def histograms(self) -> dict[str, torch.Tensor]:
        """The TensorBoard histograms of the step (``run_log.RunLog.histograms``), from the sample."""
        return {"token_ratio": self.sample.token_ratio, "log_ratio_var": self.sample.seq_log_ratio_var,
                "gate_gap": self.sample.seq_gate_gap, "gate_gap_bound": self.sample.seq_gap_bound}


def loss_settings(cfg: LossConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in LOSS_SETTINGS}


def sample_seed(seed: int, step: int, replica: int) -> int:
    """The seed of one replica's sample at one step (``train.seed``)."""
    return ((seed * 1_000_003 + step) * 1_009 + replica) % 2**63


def collect(records: GateRecords, loss: LossConfig, step: int, *, seed: int, tokens: int, sequences: int,
            group) -> StepDiagnostics | None:
    """Collective over ``group`` (the data-parallel replicas): the step's diagnostics on the
    group's rank 0, from every replica's ``records``, keeping at most ``tokens`` tokens and
    ``sequences`` sequences in all; None on the other ranks."""
    counts = all_gather_list(records.counts().to(comm_device(group)), group)
    counts = torch.stack(counts).cpu()  # [replicas, 4]
    replica = dist.get_rank(group)
    token_quota = replica_quotas(tokens, counts[:, 0].tolist())[replica]
    sequence_quota = replica_quotas(sequences, counts[:, 1].tolist())[replica]
    generator = torch.Generator().manual_seed(sample_seed(seed, step, replica))
    mine = records.sample(token_quota, sequence_quota, generator).as_dict()
    gathered = [None] * dist.get_world_size(group) if replica == 0 else None
    dist.gather_object(mine, gathered, group=group, group_dst=0)
    if replica != 0:
        return None
    totals = counts.sum(0).tolist()
    return StepDiagnostics(step=step, loss=loss_settings(loss), **dict(zip(_COUNTS, totals)),
                           sample=GateRecords.cat([GateRecords(**part) for part in gathered]))


__all__ = ["FOLDER", "StepDiagnostics", "collect", "drop_after", "size_bound", "step_file", "stored_steps"]
