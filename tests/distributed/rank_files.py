"""Files that every rank of a multi-rank test sees."""

from pathlib import Path

import torch.distributed as dist


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder both ranks see (rank 0's temporary folder)."""
    path = [str(tmp_path_factory.mktemp(name)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])
