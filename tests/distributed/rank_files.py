"""Files that every rank of a multi-rank test sees, and comparing checkpoints written there."""

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder both ranks see (rank 0's temporary folder)."""
    path = [str(tmp_path_factory.mktemp(name)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def assert_same_hf_tensors(expected: Path, actual: Path) -> None:
    """Both HF checkpoints hold the same tensor names, dtypes and values, bit for bit."""
    exp, act = HFCheckpoint(expected), HFCheckpoint(actual)
    assert sorted(act.names()) == sorted(exp.names())
    for name in exp.names():
        a, b = exp.get(name), act.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs in {actual}"
