"""Process groups for a ParallelConfig, handed explicitly to the code that communicates.

Megatron-Core keeps its groups in ``parallel_state``; we initialise them there (its model code
reads them) and return a ``ProcessGroupCollection`` that our code passes on by argument, so no
module of ours reaches for a global group.

Megatron's ``destroy_model_parallel`` forgets most of its groups without destroying them; each
gloo group keeps its worker threads until it is destroyed, so a process that builds several
layouts (the multi-rank tests build dozens) ended up with thousands of threads and slowed to a
crawl. :func:`destroy_model_parallel` therefore destroys every group :func:`initialize_model_parallel`
created.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sapo.config import ParallelConfig
from megatron_sapo.parallel import megatron_cpu


def initialize_model_parallel(cfg: ParallelConfig, seed: int = 1234):
    """Create TP/PP/EP/DP groups on the already initialised default group; seed the RNGs.

    Returns Megatron-Core's ``ProcessGroupCollection`` for these groups (``.tp``, ``.pp``,
    ``.ep``, ``.expt_tp``, ``.dp``, ...). Applies the CPU compatibility layer when CUDA is absent.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; launch with torchrun or init_process_group first")
    megatron_cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg.data_parallel_size(dist.get_world_size())  # clear error before Megatron's assertion
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    before = set(_c10d_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.etp,
        # Megatron's groups wait as long as the default group does (its own default: 30 minutes).
        distributed_timeout_minutes=_default_timeout_minutes(),
    )
    _created.extend(group for group in _c10d_groups() if group not in before)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def _default_timeout_minutes() -> int:
    """The default group's collective timeout, in whole minutes (at least 1); 30 where torch does
    not say (a private attribute of the group's backend options)."""
    import math

    try:
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        return max(1, math.ceil(backend.options._timeout.total_seconds() / 60))
    except (AttributeError, RuntimeError):
        return 30


def destroy_model_parallel() -> None:
    """Forget Megatron's groups and destroy them (see the module docstring)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    parallel_state.destroy_model_parallel()
    alive = set(_c10d_groups())  # Megatron destroys a few of them itself
    for group in _created:
        if group in alive:
            dist.destroy_process_group(group)
    _created.clear()


_created: list = []
"""The process groups the current ``initialize_model_parallel`` created."""


def _c10d_groups():
    return dist.distributed_c10d._world.pg_map.keys()
