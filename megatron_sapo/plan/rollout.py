"""The rollout side of a plan: what one SGLang server holds per GPU, and how many sequences fit.

Per GPU of a server of ``server_tp`` GPUs (SGLang splits the weights and the KV heads over its
TP ranks, replicating KV heads when ``server_tp`` exceeds them)::

    weights   = parameters x dtype bytes / server_tp
    kv/token  = 2 (K and V) x layers x max(1, kv_heads / server_tp) x head_dim x kv_bytes
    kv room   = mem_fraction_static x GPU memory - weights
    sequences = floor(kv room / (kv/token x train.max_seq_len))

``sequences`` is how many responses of the config's longest length a server decodes at once
(more when they are shorter: the KV cache is paged). ``mem_fraction_static`` is SGLang's
share of the GPU for weights and KV cache; ``rollout.server_args`` may set it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sapo.plan.layout import Hardware, Layout, dtype_bytes

GIB = 2**30


@dataclass(frozen=True)
class RolloutAssumptions:
    mem_fraction_static: float = 0.85
    """SGLang's share of a GPU for weights and KV cache (``--mem-fraction-static``), unless
    ``rollout.server_args`` sets it."""
    kv_bytes: float = 2.0
    """Bytes per KV-cache element (2: bf16; 1: an fp8 cache)."""


@dataclass(frozen=True)
class RolloutPlan:
    servers: int
    server_tp: int
    weight_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_tokens: float
    """Tokens the KV cache of one server holds."""
    sequences: int
    """Sequences of ``train.max_seq_len`` one server holds at once."""
    mem_fraction_static: float
    server_bytes_per_gpu: float
    """What SGLang takes of each of its GPUs (weights and KV cache)."""

    @property
    def fits(self) -> bool:
        return self.sequences >= 1

    @property
    def reason(self) -> str:
        return (f"an SGLang server of {self.server_tp} GPUs holds {self.weight_bytes_per_gpu / GIB:.1f} GiB of weights "
                f"per GPU, which leaves room for {self.kv_tokens:.0f} KV tokens: not one sequence of the config's "
                "length (raise rollout.server_tp)")


def server_count(cfg, hardware: Hardware) -> int:
    """Servers of the job: the rollout nodes' GPUs / server_tp when given (disaggregated), else
    the listed servers, or the colocated ``num_servers``."""
    if cfg.rollout.mode == "colocated":
        return cfg.rollout.num_servers
    if hardware.rollout_nodes:
        return max(1, hardware.rollout_nodes * hardware.gpus_per_node // cfg.rollout.server_tp)
    return len(cfg.rollout.servers)


def plan_rollout(cfg, layout: Layout, hardware: Hardware, assume: RolloutAssumptions) -> RolloutPlan:
    text = layout.text.config
    tp = cfg.rollout.server_tp
    fraction = _mem_fraction(cfg.rollout.server_args) or assume.mem_fraction_static
    weights = layout.total_params * dtype_bytes(cfg.model.params_dtype) / tp
    kv_per_token = 2 * text.num_layers * max(1.0, text.num_query_groups / tp) * text.kv_channels * assume.kv_bytes
    gpu = hardware.gpu_memory_gib * GIB
    room = max(0.0, fraction * gpu - weights)
    kv_tokens = room / kv_per_token
    return RolloutPlan(servers=server_count(cfg, hardware), server_tp=tp, weight_bytes_per_gpu=weights,
                       kv_bytes_per_token_per_gpu=kv_per_token, kv_tokens=kv_tokens,
                       sequences=int(kv_tokens // cfg.train.max_seq_len), mem_fraction_static=fraction,
                       server_bytes_per_gpu=fraction * gpu)


def _mem_fraction(args: list[str]) -> float | None:
    for i, arg in enumerate(args):
        if arg.startswith("--mem-fraction-static="):
            return float(arg.split("=", 1)[1])
        if arg == "--mem-fraction-static" and i + 1 < len(args):
            return float(args[i + 1])
    return None


__all__ = ["RolloutAssumptions", "RolloutPlan", "plan_rollout", "server_count"]
