"""Stopping a run before its last step: finish the current RL step, save a checkpoint, exit.

Two ways to ask:

* a signal: SIGTERM (``kill``, and what SLURM sends on ``scancel``, preemption, requeue) or
  SIGUSR1 (what ``--signal=USR1@T`` sends ahead of a time limit);
* a file: ``OUTPUT/STOP`` (``touch`` it). It reaches every node through the shared output
  folder and signals nothing else, so the run's SGLang servers keep serving until the step
  is done; ``examples/slurm/launch_rl.sh`` uses it before the time limit. The run removes it.

The step under way finishes (a step cut in half would leave the servers, the optimizer and the
data cursor out of step), a checkpoint of it is saved, and every rank returns; ``--resume``
then continues exactly where the run stopped. A second signal stops at once, without one.

Ranks agree before acting: a signal may reach some ranks before others, and only rank 0 looks
at the file, so each step begins with one all-reduce of what each rank saw.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo.parallel.collectives import comm_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE = "STOP"
_FILE_CODE = 1  # the all-reduce's code for the stop file; a signal's is its number (larger)


@dataclass(frozen=True)
class Stopped:
    """Why a run stopped before its last step."""

    signum: int | None
    """The signal, or None for the stop file."""

    @property
    def cause(self) -> str:
        return signal.Signals(self.signum).name if self.signum else f"the {STOP_FILE} file"

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a process killed by it would report; 0 for the file."""
        return 128 + self.signum if self.signum else 0


class StopRequest:
    """Records the first stop signal this process receives (handlers on the main thread) and
    watches the stop file ``stop_file``."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              "(signal again to stop now, without one)", file=sys.stderr, flush=True)

    def agreed(self) -> Stopped | None:
        """Collective over the default group: why the run stops now, or None to go on. A signal
        any rank received wins over the stop file, which rank 0 then removes."""
        code = self.signum or 0
        watching = self.stop_file is not None and dist.get_rank() == 0
        if not code and watching and self.stop_file.exists():
            code = _FILE_CODE
        agreed = torch.tensor([code], dtype=torch.int64, device=comm_device())
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        code = int(agreed.item())
        if not code:
            return None
        if watching:
            self.stop_file.unlink(missing_ok=True)  # consumed: a resumed run must not stop at once
        return Stopped(None if code == _FILE_CODE else code)
