"""The training job's layout and what each rank's share of the model weighs.

Parameters are not computed from formulas: the planner builds the real Megatron model of the
config, on the meta device (no memory), once per pipeline stage, inside a *fake* process group
of the job's world size (``torch.distributed``'s "fake" backend: every collective is a no-op).
Megatron then creates the TP/PP/EP/DP groups it would on the cluster and builds exactly the
modules one rank holds there, so the counts follow Megatron's own sharding (the padded
vocabulary, the stage's layers, the rank's experts) whatever the architecture. The model is
built with the local layer spec: TransformerEngine's modules hold the same parameters (its
fused norm + linear holds the norm's weight instead of the norm module) and need a GPU to
build.

Parameters are split into *dense* ones (replicated over data-parallel ranks, the distributed
optimizer shards their state over ``dp``) and *expert* ones (replicated over expert-data-parallel
ranks, ``world / (ep * etp * pp)``), as Megatron marks them (``param.allreduce``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_sapo.config import ConfigError, ParallelConfig, RunConfig

if TYPE_CHECKING:
    from megatron_sapo.models.qwen3_moe import Qwen3MoeSpec
    from megatron_sapo.models.qwen3_vl import Qwen3VLSpec



def dtype_bytes(params_dtype: str) -> int:
    """Bytes per element of ``model.params_dtype``."""
    from megatron_sapo.training.setup import PARAMS_DTYPES

    return PARAMS_DTYPES[params_dtype].itemsize


@dataclass(frozen=True)
class Hardware:
    """The GPUs a job gets."""

    nodes: int
    """Training nodes."""
    gpus_per_node: int
    gpu_memory_gib: float
    """Memory of one GPU as torch reports it (``total_memory``)."""
    rollout_nodes: int = 0
    """Nodes running SGLang servers (disaggregated rollout)."""
    memory_source: str = "given"
    """Where ``gpu_memory_gib`` came from (said in the report)."""

    @property
    def train_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds, and the largest single tensor."""

    stage: int
    dense: int
    expert: int
    largest: int
    """Elements of the largest parameter (its fp32 gradient and Adam temporaries are transient)."""
    whole_model: int
    """The stage's parameters in the whole model (over its TP and EP ranks), each counted once."""
    layers: int
    """Decoder layers of the stage."""
    last: bool
    """The last stage holds the output layer and computes the logits."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class Layout:
    """The job's parallel sizes and the model's shape as the planner needs it."""

    parallel: ParallelConfig
    world: int
    dp: int
    """Data-parallel size (replicas of the dense weights)."""
    edp: int
    """Expert-data-parallel size (replicas of each expert)."""
    spec: Qwen3MoeSpec | Qwen3VLSpec
    """The model family's spec at this layout."""
    stages: list[StageParams]
    total_params: int
    """Parameters of the whole model (all ranks' shares, each counted once)."""
    hf_config_source: str
    """Where the model's config.json came from (said in the report)."""

    @property
    def text(self):
        """The text decoder's spec (a VL spec's ``text``)."""
        return getattr(self.spec, "text", self.spec)


def builtin_hf_config(name: str, overrides: dict | None = None) -> dict:
    """config.json of a built-in model (``model.builtin``), with ``overrides``
    (``model.builtin_config``, text model only) applied."""
    if name == "tiny-qwen3-vl-moe":
        from megatron_sapo.models.tiny_vl import TINY_QWEN3_VL_MOE

        return copy.deepcopy(TINY_QWEN3_VL_MOE)
    from megatron_sapo.models.tiny import demo_config

    return demo_config(**(overrides or {}))


def read_model_config(cfg: RunConfig, hf_config: str | Path | None = None) -> tuple[dict, str]:
    """The model's config.json (and where it came from): ``hf_config`` when given, else the
    built-in model's, else ``model.hf_dir/config.json``. Weights are never read."""
    import json

    if hf_config is None and cfg.model.builtin is not None:
        overrides = cfg.model.builtin_overrides
        source = f"model.builtin = {cfg.model.builtin!r}" + (f" with {overrides}" if overrides else "")
        return builtin_hf_config(cfg.model.builtin, overrides), source
    path = Path(hf_config) if hf_config is not None else Path(cfg.model.hf_dir) / "config.json"
    if not path.is_file():
        hint = "" if hf_config is not None else " (no checkpoint here? give its config.json with --hf-config)"
        raise FileNotFoundError(f"{path}: no such file{hint}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def build_layout(cfg: RunConfig, hf_config: dict, source: str, world: int) -> Layout:
    """Sizes and per-stage parameter counts of ``cfg``'s model on ``world`` training GPUs; the
    config's own errors for a layout that does not divide."""
    from megatron_sapo.models import model_family
    from megatron_sapo.training.setup import PARAMS_DTYPES

    dp = cfg.data_parallel_size(world)
    parallel = cfg.parallel
    edp = world // (parallel.ep * parallel.etp * parallel.pp)
    family = model_family(hf_config, source)
    spec = family.from_hf_config(hf_config, parallel, router=cfg.router,
                                 params_dtype=PARAMS_DTYPES[cfg.model.params_dtype])
    if dist.is_initialized():
        # The fake group must be the default one: a process that already has a group (a rank of
        # the multi-rank tests) counts in a fresh child process.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            stages = pool.submit(count_stages, hf_config, source, cfg, world).result()
    else:
        stages = count_stages(hf_config, source, cfg, world)
    return Layout(parallel=parallel, world=world, dp=dp, edp=edp, spec=spec, stages=stages,
                  total_params=sum(s.whole_model for s in stages), hf_config_source=source)


def count_stages(hf_config: dict, source: str, cfg: RunConfig, world: int) -> list[StageParams]:
    """Each pipeline stage's parameters (see the module docstring)."""
    from megatron_sapo.models import model_family

    family = model_family(hf_config, source)
    return [_stage_params(family, hf_config, cfg, world, stage) for stage in range(cfg.parallel.pp)]


def _stage_params(family, hf_config: dict, cfg: RunConfig, world: int, stage: int) -> StageParams:
    """Build stage ``stage``'s model on the meta device as its first rank sees it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_sapo.convert.streaming import transformer_configs
    from megatron_sapo.training.setup import PARAMS_DTYPES

    parallel = cfg.parallel
    # Megatron orders ranks tp-cp-ep-dp-pp: pipeline stage s starts at rank s * world / pp.
    dist.init_process_group("fake", store=FakeStore(), rank=stage * (world // parallel.pp), world_size=world)
    try:
        pg = _megatron_groups(parallel)
        spec = family.from_hf_config(hf_config, parallel, router=cfg.router,
                                     params_dtype=PARAMS_DTYPES[cfg.model.params_dtype])
        for config in transformer_configs(spec):
            config.perform_initialization = False
            config.use_cpu_initialization = True  # else Megatron names the CUDA device, escaping meta
        with torch.device("meta"):
            model = family.build_model(spec, pg, pp_rank=stage)
        dense = expert = largest = whole = 0
        for module in model.modules():
            split = isinstance(module, _tp_split_modules())  # else replicated over its TP group
            for param in module.parameters(recurse=False):
                if getattr(param, "allreduce", True):
                    dense += param.numel()
                    whole += param.numel() * (parallel.tp if split else 1)
                else:
                    expert += param.numel()
                    whole += param.numel() * parallel.ep * (parallel.etp if split else 1)
                largest = max(largest, param.numel())
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    layers = spec.config.num_layers // parallel.pp
    return StageParams(stage=stage, dense=dense, expert=expert, largest=largest, whole_model=whole, layers=layers,
                       last=stage == parallel.pp - 1)


def _tp_split_modules() -> tuple[type, ...]:
    """Megatron's modules whose weights are split over a TP group (the local spec's)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    return ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _megatron_groups(parallel: ParallelConfig):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_sapo.parallel import megatron_cpu

    megatron_cpu.apply()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        create_gloo_process_groups=False,  # a fake world has no store for them
    )
    return ProcessGroupCollection.use_mpu_process_groups()


__all__ = ["Hardware", "Layout", "StageParams", "build_layout", "builtin_hf_config", "count_stages",
           "dtype_bytes", "read_model_config"]
