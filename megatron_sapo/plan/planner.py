"""``plan_run``: will a run config fit its GPUs, and how long will a step take.

Inputs are the run config, the model's ``config.json`` (no weights) and the hardware; outputs
one ``Plan`` with the peak memory of the fullest training GPU by item (``memory.py``), the
rollout servers' memory (``rollout.py``) and the step's work and time (``timing.py``), under
``Assumptions`` that the report states and the command line overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_sapo.config import ConfigError, RunConfig
from megatron_sapo.plan.layout import Hardware, Layout, build_layout, read_model_config
from megatron_sapo.plan.memory import MemoryAssumptions, StageMemory, stage_memory
from megatron_sapo.plan.rollout import RolloutAssumptions, RolloutPlan, plan_rollout
from megatron_sapo.plan.timing import TimingAssumptions, TimingPlan, plan_timing

GIB = 2**30
DEFAULT_GPU_MEMORY_GIB = 79.2
"""What torch reports for an 80 GB A100 or H100 (``total_memory``): used when neither a GPU nor
``--gpu-memory-gib`` says otherwise."""


@dataclass(frozen=True)
class Assumptions:
    """Everything the plan assumes beyond the config and the hardware; each is overridable."""

    memory: MemoryAssumptions = field(default_factory=MemoryAssumptions)
    rollout: RolloutAssumptions = field(default_factory=RolloutAssumptions)
    timing: TimingAssumptions = field(default_factory=TimingAssumptions)

    def flat(self) -> dict[str, float | None]:
        return {**dataclasses.asdict(self.memory), **dataclasses.asdict(self.rollout),
                **dataclasses.asdict(self.timing)}

    def replaced(self, values: dict[str, float]) -> "Assumptions":
        """With ``values`` (``name: value``) in place; an unknown name is a ConfigError."""
        parts = {"memory": self.memory, "rollout": self.rollout, "timing": self.timing}
        known = {f.name: part for part, obj in parts.items() for f in dataclasses.fields(obj)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown assumption {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in values.items():
            if value is not None and not value > 0:
                raise ConfigError(f"assumption {name} must be > 0, got {value}")
            parts[known[name]] = dataclasses.replace(parts[known[name]], **{name: value})
        return Assumptions(**parts)


@dataclass
class Plan:
    hardware: Hardware
    layout: Layout
    device: str
    transformer_engine: bool
    stages: list[StageMemory]
    budget_bytes: float
    budget_note: str
    rollout: RolloutPlan
    timing: TimingPlan
    assumptions: Assumptions

    @property
    def fullest(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.fullest.peak <= self.budget_bytes and self.rollout.fits

    def reasons(self) -> list[str]:
        """Why it does not fit (empty when it does)."""
        out = []
        worst = self.fullest
        if worst.peak > self.budget_bytes:
            largest = max((k for k in worst.breakdown if k != "reserve"), key=worst.breakdown.get)
            out.append(f"training GPU of pipeline stage {worst.stage} needs {worst.peak / GIB:.1f} GiB at the "
                       f"{worst.moment} moment, over its {self.budget_bytes / GIB:.1f} GiB; largest item: "
                       f"{largest} {worst.breakdown[largest] / GIB:.1f} GiB")
        if not self.rollout.fits:
            out.append(self.rollout.reason)
        return out


def plan_run(cfg: RunConfig, hardware: Hardware, *, hf_config: str | None = None,
             assumptions: Assumptions | None = None, device: str = "cuda", te: bool | None = None) -> Plan:
    """Plan ``cfg`` on ``hardware``. ``device``: "cuda" (the cluster) or "cpu" (the CPU tests'
    kernels and no reserve); ``te``: TransformerEngine or the local spec (default: what
    ``model.transformer_impl`` names, "auto" meaning TE on GPUs, as a cluster with TE builds)."""
    assumptions = assumptions or Assumptions()
    model_config, source = read_model_config(cfg, hf_config)
    layout = build_layout(cfg, model_config, source, hardware.train_gpus)
    if te is None:
        te = cfg.model.transformer_impl == "transformer_engine" or (
            cfg.model.transformer_impl == "auto" and device == "cuda")
    replica_rows = cfg.rollout.samples_per_step // layout.dp
    stages = [stage_memory(cfg, layout, stage, te=te, device=device, assumptions=assumptions.memory,
                           replica_rows=replica_rows) for stage in layout.stages]
    budget, note = hardware.gpu_memory_gib * GIB, f"GPU memory ({hardware.memory_source})"
    rollout = plan_rollout(cfg, layout, hardware, assumptions.rollout)
    if cfg.rollout.mode == "colocated" and not cfg.rollout.release_memory_during_train:
        budget -= rollout.server_bytes_per_gpu
        note += f", less the colocated server's {rollout.server_bytes_per_gpu / GIB:.1f} GiB (it keeps its memory)"
    timing = plan_timing(cfg, layout, hardware, rollout, assumptions.timing)
    return Plan(hardware=hardware, layout=layout, device=device, transformer_engine=te, stages=stages,
                budget_bytes=budget, budget_note=note, rollout=rollout, timing=timing, assumptions=assumptions)


__all__ = ["Assumptions", "DEFAULT_GPU_MEMORY_GIB", "GIB", "Plan", "plan_run"]
