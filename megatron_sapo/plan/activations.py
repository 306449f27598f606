"""What one microbatch's forward keeps for backward, per GPU: the activations of the planner.

Every figure is the bytes of tensors autograd saves, item by item, for the layer structure of
Qwen3-MoE in Megatron-Core (pre-norm attention with QK-norm and RoPE, then a top-k MoE or a
dense SwiGLU MLP), under the run's TP / SP / EP and recompute settings. Symbols, per
microbatch and per GPU:

    n    tokens of the microbatch (rows x padded length, or the packed length)
    n_s  n / tp with sequence parallelism (the norms, the residual stream, MoE inputs), else n
    b, s rows and padded length (packed: b = 1, s = n)
    h    hidden size;  q = heads x head_dim;  kv = kv_heads x head_dim  (q, kv split over tp)
    r    expert tokens a GPU computes: n_s x top-k x ``expert_load`` (1: balanced routing)
    f    expert width / etp;  F dense MLP width / tp;  E experts
    a    bytes of the parameter dtype (2 bf16, 4 fp32); norms compute in fp32 (4 bytes)

**Local spec** (plain torch modules; measured item by item on CPU with
``torch.autograd.graph.saved_tensors_hooks``, tests/distributed/test_plan_memory.py checks the
whole against allocator measurements):

    RMSNorm (x3 per layer, the final one too)   8 n_s h + 4 n_s    fp32 input and x * rstd, rstd
    QKV input                                    a n_s h            (SP: saved before the all-gather)
    Q-norm                                       8 n q              fp32 input copy and output
    K-norm                                       8 n kv (bf16); fp32: 4 n (q + 2 kv) + 4 n kv (a view of QKV)
    core attention q, k, v (GQA-expanded)        3 a n q
    attention probabilities                      b (heads/tp) s^2 x (4, + a in bf16: the cast for P V)
    output projection input                      a n q
    router input, indices, scores, routing map   a n_s h + n_s (20 k + 5 E)
    experts: permuted input, per routed token    a r h + r (6 a f + 4)
                                                 (fc1 output, SwiGLU halves and output, fc2 input; the prob)
    dense MLP (mlp_only_layers)                  a n_s h + 6 a n F

**TransformerEngine spec** (fused norm + linear, flash attention, grouped expert GEMM; from what
those modules save, not measured here):

    norm + QKV (LayerNormLinear)                 2 a n_s h + 4 n_s
    Q/K-norms                                    2 a n (q + kv)
    flash attention q, k, v, output, LSE         a n (2 q + 2 kv) + 4 n heads
    pre-MLP norm, router                         2 a n_s h + 4 n_s + n_s (20 k + 5 E)
    grouped experts                              a r h + r (6 a f + 4)  (the spec leaves Megatron's
                                                 ``bias_activation_fusion`` off: SwiGLU unfused, as local)

**Recompute**: "full" keeps each recomputed chunk's input (``a n_s h``) instead of its layers'
activations; in backward one chunk is rebuilt at a time. "selective" drops the probabilities
(and the GQA-expanded k, v: Megatron checkpoints the core attention from q, k, v).

**Backward working set**: besides the saved tensors, a layer's backward holds its gradients;
for the local spec's attention, measured at the peak of a step, four fp32 score-sized buffers at
once (the gradient of the probabilities and the copies autograd makes to undo the in-place
masked fill on a view of the scores: 4 x 4 b (heads/tp) s^2), plus a few hidden-sized
gradients (``4 a n h``). The planner counts the layer's saved
tensors as well, though autograd has freed some of them by then: conservative by up to one
score buffer. The local spec also keeps one
score buffer for the whole run (``score_buffer_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class ModelDims:
    """The widths of the text decoder, per GPU where split."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    topk: int
    expert_width: int
    dense_width: int
    padded_vocab: int
    moe_layers: tuple[bool, ...]

    @classmethod
    def of(cls, text_spec) -> "ModelDims":
        c = text_spec.config
        return cls(hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_query_groups,
                   head_dim=c.kv_channels, experts=c.num_moe_experts or 0, topk=c.moe_router_topk or 0,
                   expert_width=c.moe_ffn_hidden_size or 0, dense_width=c.ffn_hidden_size,
                   padded_vocab=text_spec.padded_vocab_size, moe_layers=tuple(text_spec.moe_layers))


@dataclass(frozen=True)
class Shape:
    """One microbatch as the model runs it."""

    rows: int
    seq: int
    """Padded length (packed: the packed sequence, rows = 1)."""

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


@dataclass(frozen=True)
class Split:
    """How a GPU's share of a layer is cut."""

    tp: int
    etp: int
    sequence_parallel: bool
    dtype_bytes: int
    te: bool
    expert_load: float = 1.0


def layer_bytes(dims: ModelDims, shape: Shape, split: Split, moe: bool, *, selective: bool = False) -> dict[str, float]:
    """Saved bytes of one decoder layer, by item (see the module docstring)."""
    n = shape.tokens
    n_s = n / split.tp if split.sequence_parallel else n
    a, t = split.dtype_bytes, split.tp
    q = dims.heads * dims.head_dim / t
    kv = dims.kv_heads * dims.head_dim / t
    heads = dims.heads / t
    h = dims.hidden
    items: dict[str, float] = {}
    if split.te:
        items["attention norms and inputs"] = 2 * a * n_s * h + FP32 * n_s + 2 * a * n * (q + kv)
        items["attention q, k, v, output"] = a * n * (2 * q + 2 * kv) + FP32 * n * heads
        items["mlp norm and router"] = 2 * a * n_s * h + FP32 * n_s + _router(dims, n_s)
    else:
        k_norm = 8 * n * kv if a == 2 else FP32 * n * (q + 2 * kv) + FP32 * n * kv
        items["attention norms and inputs"] = _norm(n_s, h) + a * n_s * h + 8 * n * q + k_norm
        qkv = a * n * (q + 2 * kv) if selective else 3 * a * n * q
        items["attention q, k, v, output"] = qkv + a * n * q
        if not selective:
            items["attention probabilities"] = shape.rows * heads * shape.seq ** 2 * (FP32 + (a if a != FP32 else 0))
        items["mlp norm and router"] = _norm(n_s, h) + a * n_s * h + (_router(dims, n_s) if moe else 0)
    if moe:
        routed = n_s * dims.topk * split.expert_load
        f = dims.expert_width / split.etp
        per_token = 6 * a * f + FP32
        items["experts"] = a * routed * h + routed * per_token
    else:
        items["dense mlp"] = (0 if split.te else a * n_s * h) + 6 * a * n * dims.dense_width / t
    return items


def backward_working_bytes(dims: ModelDims, shape: Shape, split: Split) -> float:
    """Gradients one layer's backward holds at once (see the module docstring)."""
    hidden = 4 * split.dtype_bytes * shape.tokens * dims.hidden
    if split.te:
        return hidden
    return hidden + 4 * FP32 * shape.rows * dims.heads / split.tp * shape.seq ** 2


def forward_working_bytes(dims: ModelDims, shape: Shape, split: Split) -> float:
    """What a forward-only pass holds beyond the weights: one layer's outputs in flight, and the
    local spec's scaled scores and probabilities (fp32)."""
    hidden = 4 * split.dtype_bytes * shape.tokens * dims.hidden
    if split.te:
        return hidden
    return hidden + 2 * FP32 * shape.rows * dims.heads / split.tp * shape.seq ** 2


def score_buffer_bytes(dims: ModelDims, shape: Shape, split: Split) -> float:
    """The local spec's attention scores are computed into a buffer Megatron keeps for the whole
    run (``get_global_memory_buffer``), sized by the largest microbatch; none with TE."""
    return 0.0 if split.te else split.dtype_bytes * shape.rows * dims.heads / split.tp * shape.seq ** 2


def _norm(n_s: float, h: int) -> float:
    return 2 * FP32 * n_s * h + FP32 * n_s


def _router(dims: ModelDims, n_s: float) -> float:
    """Top-k indices (int64) and scores (fp32), the dispatcher's indices, the routing map and
    dense probabilities ([E, n] bool and fp32)."""
    return n_s * (20 * dims.topk + 5 * dims.experts)


@dataclass(frozen=True)
class StageActivations:
    """One microbatch's activations on a GPU of one pipeline stage."""

    saved: float
    """Held from the end of its forward until its backward (all layers, as recompute leaves them)."""
    rebuilt: float
    """Peak extra during backward: the recomputed chunk's activations and one layer's gradients."""
    items: dict[str, float]
    """``saved`` by item, for the report."""


def stage_activations(dims: ModelDims, shape: Shape, split: Split, layers: list[bool], *, recompute: str,
                      recompute_method: str, recompute_num_layers: int) -> StageActivations:
    """Activations of ``layers`` (one MoE flag per layer of the stage) for one microbatch."""
    n_s = shape.tokens / split.tp if split.sequence_parallel else shape.tokens
    chunk_input = split.dtype_bytes * n_s * dims.hidden
    per_layer = [layer_bytes(dims, shape, split, moe, selective=recompute == "selective") for moe in layers]
    totals = [sum(items.values()) for items in per_layer]
    working = backward_working_bytes(dims, shape, split)
    items: dict[str, float] = {}
    if recompute != "full":
        for layer_items in per_layer:
            for key, value in layer_items.items():
                items[key] = items.get(key, 0.0) + value
        rebuilt = working
        if recompute == "selective" and not split.te:
            rebuilt += shape.rows * dims.heads / split.tp * shape.seq ** 2 * (FP32 + split.dtype_bytes)
        return StageActivations(saved=sum(items.values()), rebuilt=rebuilt, items=items)
    count = recompute_num_layers
    if recompute_method == "uniform":
        chunks = [list(range(i, min(i + count, len(layers)))) for i in range(0, len(layers), count)]
        kept: list[int] = []
    else:  # block: the first `count` layers recomputed one by one, the rest kept
        chunks = [[i] for i in range(min(count, len(layers)))]
        kept = list(range(min(count, len(layers)), len(layers)))
    items["recompute chunk inputs"] = chunk_input * len(chunks)
    for i in kept:
        for key, value in per_layer[i].items():
            items[key] = items.get(key, 0.0) + value
    largest_chunk = max((sum(totals[i] for i in chunk) for chunk in chunks), default=0.0)
    return StageActivations(saved=sum(items.values()), rebuilt=largest_chunk + working, items=items)


__all__ = ["ModelDims", "Shape", "Split", "StageActivations", "backward_working_bytes", "forward_working_bytes",
           "layer_bytes", "score_buffer_bytes", "stage_activations"]
