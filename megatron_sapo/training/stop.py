"""Stopping a run on a signal: finish the current RL step, save a checkpoint, exit.

SLURM sends SIGTERM on ``scancel``, preemption and requeue, and SIGUSR1 ahead of the time
limit where a job asks for it (``--signal=USR1@T``). Either one asks the run to stop: the step
under way finishes (a step cut in half would leave the servers, the optimizer and the data
cursor out of step), a checkpoint of it is saved, and every rank returns. ``--resume`` then
continues exactly where the run stopped. A second signal stops at once, without a checkpoint.

Ranks agree before acting: the signal may reach some ranks before others (or only the
launcher's children), so each step ends with one all-reduce of the signal numbers.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal this process receives (handlers on the main thread)."""

    def __init__(self) -> None:
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

    def agreed(self) -> int | None:
        """Collective over the default group: the signal any rank received, or None."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        received = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item()) or None
