"""Run a function on N local ranks joined in one process group (commands that "spawn their own ranks")."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from math import lcm
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_sapo.config import ParallelConfig


def world_size_for(parallel: ParallelConfig) -> int:
    """The fewest ranks that hold one copy of the model under this layout."""
    return lcm(parallel.tp * parallel.pp, parallel.etp * parallel.ep * parallel.pp)


class RankError(RuntimeError):
    """A spawned rank raised; the message is the rank's own last error line."""


def spawn(fn: Callable, world_size: int, *args, forward_signals: Sequence[int] = ()):
    """Call ``fn(*args)`` on ``world_size`` processes and return rank 0's result (pickled back);
    NCCL with one GPU each when there are enough GPUs, gloo otherwise. If one rank fails, the
    others are stopped and ``RankError`` carries the failing rank's error (its full traceback
    goes to stderr first).

    ``forward_signals``: signals this process passes on to every rank, which handle them
    themselves (``kill`` reaches only this process).
    """
    if not torch.cuda.is_available():
        # Megatron's fused elementwise kernels go through torch.compile, which on CPU would
        # compile C++ for every new shape: slower than the eager ops for these short jobs.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous, result = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "result.pkl")
        context = mp.spawn(_run_rank, args=(world_size, rendezvous, result, fn, args), nprocs=world_size, join=False)
        with _forwarded(forward_signals, context.processes):
            try:
                while not context.join():
                    pass
            except mp.ProcessRaisedException as err:
                print(str(err), file=sys.stderr)
                lines = [line for line in str(err).splitlines() if line.strip()]
                raise RankError(f"rank {err.error_index} failed: {lines[-1] if lines else err}") from None
            except mp.ProcessExitedException as err:
                raise RankError(f"rank {err.error_index} exited with status {err.exit_code}"
                                + (f" ({err.signal_name})" if err.signal_name else "")) from None
        with open(result, "rb") as f:
            return pickle.load(f)


@contextmanager
def _forwarded(signals: Sequence[int], processes: list):
    """Pass ``signals`` on to ``processes`` while inside."""
    if not signals or threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_rank(rank: int, world_size: int, rendezvous: str, result: str, fn: Callable, args: tuple) -> None:
    use_nccl = torch.cuda.device_count() >= world_size
    if use_nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=world_size)
    try:
        value = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result, "wb") as f:
            pickle.dump(value, f)
