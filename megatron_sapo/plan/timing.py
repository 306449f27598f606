"""The step's work and a time estimate: training FLOPs at an assumed MFU, rollout decoding as
a memory-bandwidth roofline, the weight sync as bytes over the network.

With ``N`` the parameters a token runs through (attention, router, top-k experts per layer, the
output layer), ``L`` layers, ``d = heads x head_dim``, ``R`` responses of ``m`` tokens
(prompt + response; ``mean_row_tokens``, by default ``train.max_seq_len``: every row at the
cap, an upper bound)::

    forward  = 2 N R m + 2 L d R m^2          (causal attention: half the square, Q K^T and P V)
    step     = forward (old log-probs) + 3 forward (update) [+ forward: full recompute,
               + the attention part: selective]
    train_s  = step / (training GPUs x gpu_tflops x mfu)

    decode step  = (weights per GPU + c x m / 2 x KV bytes per token per GPU) / (hbm x decode_efficiency)
    rollout_s    = max(max_new_tokens, R_server x response / c) x decode step

with ``c`` the sequences a server decodes at once (``rollout.py``, at length ``m``) and
``R_server`` its share of the responses; ``sync_s`` = weight bytes / network bandwidth. The loop
is sequential, ``step_s = rollout_s + sync_s + train_s``, unless the servers have GPUs of their
own (rollout nodes) and generate ahead (``rollout.max_staleness >= 1``): then generation runs
while the trainer trains, ``step_s = max(rollout_s, train_s) + sync_s`` (the sync waits for
both, ``rollout/pipeline.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_sapo.plan.layout import Hardware, Layout, dtype_bytes


@dataclass(frozen=True)
class TimingAssumptions:
    mfu: float = 0.25
    """Model FLOPs utilisation of the training GPUs."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak of one GPU, TFLOP/s (H100 / H200 SXM)."""
    hbm_tbps: float = 3.35
    """HBM bandwidth of one rollout GPU, TB/s (H100 SXM; H200: 4.8)."""
    decode_efficiency: float = 0.5
    """Share of the HBM bandwidth a decode step achieves."""
    network_gbps: float = 50.0
    """GB/s into each server for the weight sync (400 Gb/s InfiniBand)."""
    mean_row_tokens: float | None = None
    """Mean prompt + response tokens of a row; unset: train.max_seq_len (every row at the cap)."""


@dataclass(frozen=True)
class TimingPlan:
    tokens_per_step: float
    train_flops_per_step: float
    train_s: float
    rollout_s: float
    sync_s: float
    overlapped: bool = False
    """Generation runs during training (rollout nodes and ``rollout.max_staleness >= 1``)."""

    @property
    def step_s(self) -> float:
        if self.overlapped:
            return max(self.train_s, self.rollout_s) + self.sync_s
        return self.train_s + self.sync_s + self.rollout_s


def active_params(text_spec) -> float:
    """Parameters one token runs through (the embedding is a lookup)."""
    c = text_spec.config
    q, kv = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    routed = c.hidden_size * (c.num_moe_experts or 0) + (c.moe_router_topk or 0) * 3 * c.hidden_size * (
        c.moe_ffn_hidden_size or 0)
    dense = 3 * c.hidden_size * c.ffn_hidden_size
    mlps = sum(routed if moe else dense for moe in text_spec.moe_layers)
    return len(text_spec.moe_layers) * attention + mlps + c.hidden_size * text_spec.padded_vocab_size


def plan_timing(cfg, layout: Layout, hardware: Hardware, rollout, assume: TimingAssumptions) -> TimingPlan:
    text = layout.text
    c = text.config
    rows = cfg.rollout.samples_per_step
    m = assume.mean_row_tokens or cfg.train.max_seq_len
    n_active = active_params(text)
    linear = 2 * n_active * rows * m
    attention = 2 * c.num_layers * c.num_attention_heads * c.kv_channels * rows * m * m
    forward = linear + attention
    extra = {"full": forward, "selective": attention}.get(cfg.parallel.recompute, 0.0)
    flops = forward + 3 * forward + extra
    train_s = flops / (hardware.train_gpus * assume.gpu_tflops * 1e12 * assume.mfu)
    weight_bytes = layout.total_params * dtype_bytes(cfg.model.params_dtype)
    response = max(1.0, m - cfg.data.max_prompt_tokens) if assume.mean_row_tokens else cfg.rollout.max_new_tokens
    per_server = math.ceil(rows / rollout.servers)
    concurrent = max(1, min(per_server, int(rollout.kv_tokens // m)))
    read = rollout.weight_bytes_per_gpu + concurrent * m / 2 * rollout.kv_bytes_per_token_per_gpu
    decode_step = read / (assume.hbm_tbps * 1e12 * assume.decode_efficiency)
    rollout_s = max(cfg.rollout.max_new_tokens, per_server * response / concurrent) * decode_step
    return TimingPlan(tokens_per_step=rows * m, train_flops_per_step=flops, train_s=train_s,
                      rollout_s=rollout_s, sync_s=weight_bytes / (assume.network_gbps * 1e9),
                      overlapped=bool(cfg.rollout.max_staleness and hardware.rollout_nodes))


__all__ = ["TimingAssumptions", "TimingPlan", "active_params", "plan_timing"]
