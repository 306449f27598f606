"""Run a function on N local ranks joined in one process group (commands that "spawn their own ranks")."""

from __future__ import annotations

import os
import sys
import tempfile
from math import lcm
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_sapo.config import ParallelConfig


def world_size_for(parallel: ParallelConfig) -> int:
    """The fewest ranks that hold one copy of the model under this layout."""
    return lcm(parallel.tp * parallel.pp, parallel.etp * parallel.ep * parallel.pp)


class RankError(RuntimeError):
    """A spawned rank raised; the message is the rank's own last error line."""


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(*args)`` on ``world_size`` processes; NCCL with one GPU each when there are
    enough GPUs, gloo otherwise. If one rank fails, the others are stopped and ``RankError``
    carries the failing rank's error (its full traceback goes to stderr first)."""
    if not torch.cuda.is_available():
        # Megatron's fused elementwise kernels go through torch.compile, which on CPU would
        # compile C++ for every new shape: slower than the eager ops for these short jobs.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_run_rank, args=(world_size, rendezvous, fn, args), nprocs=world_size, join=True)
        except mp.ProcessRaisedException as err:
            print(str(err), file=sys.stderr)
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise RankError(f"rank {err.error_index} failed: {lines[-1] if lines else err}") from None


def _run_rank(rank: int, world_size: int, rendezvous: str, fn: Callable, args: tuple) -> None:
    use_nccl = torch.cuda.device_count() >= world_size
    if use_nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()
