"""Peak memory of one training GPU through an RL step, by item.

A step on one GPU is the old-log-prob pass (forward only), then ``train.minibatches`` updates
(forward and backward of each microbatch, then the optimizer step). The planner takes the
largest of these moments, in steady state (Adam's state exists from the first optimizer step):

* **loss**: a microbatch's forward is done and its backward starts: every in-flight
  microbatch's saved activations, the logits, their gradient and the log-prob op's fp32 chunks
  (last pipeline stage only);
* **layer backward**: the saved activations, the recomputed chunk (full recompute) and one
  layer's gradients;
* **old log-probs**: the forward-only pass, one layer's working set and one microbatch's logits
  (the pass runs its head inside the forward step, ``training/forward.py``);
* **optimizer step**: Adam's temporaries (none for TransformerEngine's fused Adam, which
  Megatron uses where TE is installed: the planner assumes it with the TE spec; torch's
  multi-tensor Adam on CUDA: one fp32 copy of the rank's share of the parameters; torch's
  per-tensor Adam on CPU: two fp32 copies of the largest tensor);
* **gradient reduce** (CPU only): gloo's reduce-scatter works on a copy of the coalesced fp32
  gradient buffers (NCCL's is in place).

Always held: the weights, Megatron DDP's fp32 gradient buffer (``grad_reduce_in_fp32``), the
distributed optimizer's fp32 master weights (bf16 runs) and Adam's two moments, sharded over
the data-parallel ranks (dense weights) or expert-data-parallel ranks (experts), the replica's
batch (``.to(device)`` once: tokens, targets, loss mask, rollout and old log-probs, 28 bytes a
position at ``train.max_seq_len``) and the running microbatch's inputs (the packed local spec's
``n^2`` mask, the routes under routing replay). Under pipeline parallelism (1F1B) stage ``s``
of ``pp`` holds ``pp - s`` microbatches in flight.

Microbatches are sized for the worst case the config allows: a packed token budget ``B`` runs
one sequence of ``B`` tokens; an unpacked budget ``B // max_seq_len`` rows of
``max_seq_len``; fixed rows ``micro_batch_size`` rows of ``max_seq_len``; never more rows than
the pass has (an update: the replica's rows / ``train.minibatches``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sapo.config import RunConfig
from megatron_sapo.plan.activations import (FP32, ModelDims, Shape, Split, forward_working_bytes,
                                           score_buffer_bytes, stage_activations)
from megatron_sapo.plan.layout import Layout, StageParams, dtype_bytes

LOGPROB_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
"""The log-prob op's fp32 working chunk (``parallel/vocab_parallel.py``)."""
BATCH_BYTES_PER_POSITION = 28
"""tokens, targets (int64), loss mask, rollout and old log-probs (fp32)."""

BREAKDOWN_KEYS = ("params", "grads", "optimizer", "activations", "logits", "routes", "batch", "reserve")


@dataclass(frozen=True)
class MemoryAssumptions:
    expert_load: float = 1.0
    """Expert tokens on the busiest GPU over the balanced share (1: balanced routing)."""
    reserve_gib: float = 3.0
    """Memory outside tensors on a GPU: CUDA context, NCCL and cuBLAS workspaces."""
    fragmentation: float = 0.10
    """Caching-allocator overhead, as a fraction of the tensor peak."""


@dataclass
class StageMemory:
    """One pipeline stage's peak, in bytes, by item (``BREAKDOWN_KEYS``)."""

    stage: int
    breakdown: dict[str, float]
    moment: str
    """Which moment sets the peak ("loss", "layer backward", "old log-probs", "optimizer step",
    and on CPU "gradient reduce")."""
    moments: dict[str, float]
    """Tensor bytes at each moment (the largest is the peak)."""
    shape: Shape
    activation_items: dict[str, float] = field(default_factory=dict)

    @property
    def tensor_peak(self) -> float:
        return sum(v for k, v in self.breakdown.items() if k != "reserve")

    @property
    def peak(self) -> float:
        return sum(self.breakdown.values())


def microbatch_shape(cfg: RunConfig, rows: int) -> Shape:
    """The largest microbatch the config allows over a pass of ``rows`` rows (see the module
    docstring)."""
    multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    longest = -(-cfg.train.max_seq_len // multiple) * multiple
    budget = cfg.train.max_tokens_per_microbatch
    if budget and cfg.train.pack_sequences:
        return Shape(rows=1, seq=min(budget // multiple * multiple, rows * longest))
    if budget:
        return Shape(rows=max(1, min(rows, budget // longest)), seq=longest)
    return Shape(rows=min(rows, cfg.train.micro_batch_size), seq=longest)


def adam_impl(device: str, te: bool) -> str:
    """Which Adam Megatron runs: TransformerEngine's fused one where TE is, else torch's
    (multi-tensor on CUDA, per-tensor on CPU)."""
    if te:
        return "fused"
    return "foreach" if device == "cuda" else "per-tensor"


def stage_memory(cfg: RunConfig, layout: Layout, stage: StageParams, *, te: bool, device: str,
                 assumptions: MemoryAssumptions, replica_rows: int) -> StageMemory:
    """The peak of one GPU of ``stage`` (see the module docstring)."""
    a = dtype_bytes(cfg.model.params_dtype)
    dims = ModelDims.of(layout.text)
    parallel = cfg.parallel
    shape = microbatch_shape(cfg, replica_rows // cfg.train.minibatches)  # an update's microbatch
    pass_shape = microbatch_shape(cfg, replica_rows)  # the old-log-prob pass's
    split = Split(tp=parallel.tp, etp=parallel.etp, sequence_parallel=parallel.sequence_parallel, dtype_bytes=a,
                  te=te, expert_load=assumptions.expert_load)
    first_layer = stage.stage * stage.layers
    layers = list(dims.moe_layers[first_layer:first_layer + stage.layers])
    acts = stage_activations(dims, shape, split, layers, recompute=parallel.recompute,
                             recompute_method=parallel.recompute_method,
                             recompute_num_layers=parallel.recompute_num_layers)
    in_flight = parallel.pp - stage.stage
    n = shape.tokens

    master = FP32 if a != FP32 else 0  # bf16 runs keep fp32 master weights in the optimizer
    states = stage.dense / layout.dp + stage.expert / layout.edp
    static = {
        "params": stage.total * a,
        "grads": stage.total * FP32,
        "optimizer": states * (2 * FP32 + master),
        "batch": replica_rows * cfg.train.max_seq_len * BATCH_BYTES_PER_POSITION,
        "activations": max(score_buffer_bytes(dims, s, split) for s in (shape, pass_shape)),
    }
    running = {"activations": in_flight * acts.saved, "routes": _route_bytes(cfg, dims, shape),
               "batch": _microbatch_inputs(shape, te, cfg)}
    # What each moment adds to the static memory; the largest sets the peak.
    moments = {"layer backward": {**running, "activations": running["activations"] + acts.rebuilt}}
    if stage.last:
        vocab_shard = dims.padded_vocab / parallel.tp
        chunk = min(n * vocab_shard * FP32, LOGPROB_CHUNK_BYTES[device])
        moments["loss"] = {**running, "logits": 2 * a * n * vocab_shard + chunk * (1 if a == FP32 else 2)}
        pass_tokens = pass_shape.tokens
        moments["old log-probs"] = {
            "batch": _microbatch_inputs(pass_shape, te, cfg),
            "routes": _route_bytes(cfg, dims, pass_shape),
            "activations": forward_working_bytes(dims, pass_shape, split),
            "logits": a * pass_tokens * vocab_shard + 2 * min(pass_tokens * vocab_shard * FP32,
                                                              LOGPROB_CHUNK_BYTES[device])}
    adam = adam_impl(device, te)
    if adam != "fused":
        moments["optimizer step"] = {"optimizer": FP32 * states if adam == "foreach" else 2 * FP32 * stage.largest}
    if device == "cpu":  # gloo's reduce-scatter works on a copy of the (coalesced) gradient buffers
        moments["gradient reduce"] = {"grads": FP32 * stage.total}
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    breakdown = {key: static.get(key, 0.0) + moments[moment].get(key, 0.0) for key in BREAKDOWN_KEYS[:-1]}
    # A CPU's allocator is malloc: the reserve is a GPU's (the planner's CPU figures are tensors only).
    tensors = sum(breakdown.values())
    breakdown["reserve"] = assumptions.reserve_gib * 2**30 + assumptions.fragmentation * tensors \
        if device == "cuda" else 0.0
    base = sum(static.values())
    return StageMemory(stage=stage.stage, breakdown=breakdown, moment=moment, shape=shape,
                       moments={m: base + sum(extra.values()) for m, extra in moments.items()},
                       activation_items={k: in_flight * v for k, v in acts.items.items()})


def _route_bytes(cfg: RunConfig, dims: ModelDims, shape: Shape) -> float:
    """The running microbatch's replayed routes on the GPU: int64 ``[n, MoE layers of the whole
    model, top-k]`` (``training/microbatch.py``), and the replay's working copies of them (sorted
    values, indices, the selection: four in all); a replica's routes otherwise wait in host
    memory (uint8)."""
    if not cfg.train.replays_routes:
        return 0.0
    return 4 * 8.0 * shape.tokens * sum(dims.moe_layers) * dims.topk


def _microbatch_inputs(shape: Shape, te: bool, cfg: RunConfig) -> float:
    """Token ids, positions and targets of the running microbatch, and the packed local spec's
    block-diagonal mask (bool ``[n, n]``; TransformerEngine takes ``cu_seqlens`` instead)."""
    mask = shape.tokens ** 2 if cfg.train.pack_sequences and not te else 0
    return 3 * 8 * shape.tokens + mask


__all__ = ["BREAKDOWN_KEYS", "MemoryAssumptions", "StageMemory", "adam_impl", "microbatch_shape",
           "stage_memory"]
