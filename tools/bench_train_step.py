"""Benchmark: one training step with padded rows, a token budget, and packing, side by side.

One step here is what the trainer does per minibatch on one rank: the old-log-prob pass
(``compute_logprobs``, forward only) and one update (``train_minibatch``: forward, backward,
optimizer step). It runs three ways over the same batch, on a Qwen3-30B-A3B-shaped model (true
widths: hidden 2048, 32 query / 4 KV heads of 128, experts of width 768, top-8) with random
weights, built straight from a ``TransformerConfig`` (no Hugging Face files):

* ``padded-step``: the trainer before token budgets: k consecutive rows per microbatch, every
  row padded to the batch's longest (the baseline the time ratios are taken against).
* ``padded``: ``Batching(micro_batch_size=k)``, k consecutive rows per microbatch, each
  microbatch padded to its own longest row (fixed rows, as ``train.micro_batch_size``).
* ``budget``: ``Batching(max_tokens=B)``, rows grouped longest first under a token budget.
* ``packing``: ``Batching(max_tokens=B, pack=True)``, the budget's rows concatenated.

The batch imitates RL responses: ``--rows`` lengths drawn (seeded) from a lognormal whose
median is a fifth of ``--cap`` and whose spread puts 2% of the draws above the cap, where they
are truncated. Every target of a row is a loss token; the cost does not depend on where the
prompt ends.

Each method is timed ``--repeats`` times after one warm-up step (packing: the cheapest; the
first step also allocates the optimizer's state), the methods taking turns so that a machine
shared with other work slows them alike; the best run counts.
Useful-token fraction is ``StepMetrics.real_tokens / processed_tokens`` (processed: the token
positions the model ran, padding included).

With ``--device cuda`` the script also reports real tokens per second, model TFLOP/s and peak
memory (``torch.cuda.max_memory_allocated``). Model FLOPs count real tokens only (padding is
not useful work), with ``N`` the active parameters per token (attention, router, top-k experts
per layer, and the output layer; not the embedding lookup), ``L`` the layers, ``d = heads x
head_dim`` and ``len_i`` the rows' lengths::

    forward-only pass:  2 N sum(len_i) + 2 L d sum(len_i^2)
    update:             6 N sum(len_i) + 6 L d sum(len_i^2)

where ``2 L d len^2`` is causal attention's forward (``Q K^T`` and ``P V``, 2 FLOPs per
multiply-add, half the square), and backward costs twice the forward.

The CPU defaults shrink the experts (16 of 128; a token still runs top-8, so the work per
token is the real one) and the vocabulary (8,192 of 151,936: at one layer the output layer's
share of the work, 23%, is then nearer the 48-layer model's 10%), and keep the rows short, so
that a run takes about five minutes on two cores; the output says so. The last line printed is
one JSON object keyed by method, plus ``settings``.

    .venv/bin/python tools/bench_train_step.py
    python3 tools/bench_train_step.py --device cuda --dtype bfloat16 --layers 4 --experts 128 \
        --vocab 151936 --rows 64 --cap 4096 --micro-batch-size 2      # tools/gpu_check.sh
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench_convert import QWEN3_30B_A3B
from megatron_sapo.config import LossConfig, OptimizerConfig, ParallelConfig
from megatron_sapo.models import qwen3_moe
from megatron_sapo.parallel.groups import initialize_model_parallel
from megatron_sapo.parallel.ports import free_port
from megatron_sapo.plan.measure import random_batch
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import TrainBatch

METHODS = ("padded-step", "padded", "budget", "packing")
TRUNCATED = 0.02
"""Share of the lognormal's draws above the cap (truncated to it)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and batch live")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (all MoE; the real model has 48)")
    parser.add_argument("--experts", type=int, default=16, help="experts per layer (the real model has 128)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the real model has 151936)")
    parser.add_argument("--rows", type=int, default=16, help="rows (responses) in the minibatch")
    parser.add_argument("--cap", type=int, default=512, help="longest row (tokens)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per microbatch of the padded method")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="token budget B of the budget and packing methods (0: the cap; at least the cap)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (the best counts)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the row lengths and tokens (Megatron seeds the weights)")
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or args.cap
    if args.max_tokens < args.cap:
        parser.error(f"--max-tokens {args.max_tokens} is below --cap {args.cap}: a row is never split")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.experts < QWEN3_30B_A3B["num_experts_per_tok"]:
        parser.error(f"--experts must be at least the top-k, {QWEN3_30B_A3B['num_experts_per_tok']}")
    return args


def batchings(args) -> dict[str, Batching]:
    return {"padded-step": Batching(micro_batch_size=args.micro_batch_size),
            "padded": Batching(micro_batch_size=args.micro_batch_size),
            "budget": Batching(max_tokens=args.max_tokens),
            "packing": Batching(max_tokens=args.max_tokens, pack=True)}


# ---- model and batch -----------------------------------------------------------------------

def hf_config(args) -> dict:
    """Qwen3-30B-A3B's config.json with this run's layers, experts and vocabulary."""
    return {**QWEN3_30B_A3B, "num_hidden_layers": args.layers, "num_experts": args.experts,
            "vocab_size": args.vocab}


def single_rank_groups(device: str):
    """A one-rank process group (NCCL on CUDA, gloo on CPU) and Megatron's groups on it."""
    if device == "cuda":
        torch.cuda.set_device(0)
    port = free_port()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    return initialize_model_parallel(ParallelConfig())


def build_trainable(spec, pg, total_steps: int):
    """The model with random weights (Megatron's initialisation), wrapped for training.
    With CUDA present Megatron builds it on the GPU (``use_cpu_initialization`` is off)."""
    model = qwen3_moe.build_model(spec, pg)
    return build_optimizer(model, OptimizerConfig(lr=1e-6), pg, total_steps=total_steps)


def row_lengths(rows: int, cap: int, seed: int) -> list[int]:
    """Lognormal lengths, median ``cap / 5``, ``TRUNCATED`` of them above ``cap`` (cut to it)."""
    sigma = math.log(5) / _normal_quantile(1 - TRUNCATED)
    draws = torch.randn(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = (math.log(cap / 5) + sigma * draws).exp().round().clamp(2, cap)
    return [int(n) for n in lengths.tolist()]


def _normal_quantile(p: float) -> float:
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


# ---- one timed step --------------------------------------------------------------------------

@dataclass
class StepTime:
    logprob_s: float
    update_s: float
    useful_fraction: float
    microbatches: int
    peak_memory_gib: float | None

    @property
    def seconds(self) -> float:
        return self.logprob_s + self.update_s


def timed_step(trainable, batch: TrainBatch, batching: Batching, spec, pg, *, whole_width: bool = False) -> StepTime:
    """The old-log-prob pass, then one update, each timed to its last kernel. ``whole_width``:
    every row counts as long as the batch's longest (each is padded to it)."""
    model, optimizer, scheduler = trainable
    real_tokens = sum(batch.row_lengths)
    if whole_width:
        batch = dataclasses.replace(batch, lengths=None)
    on_cuda = batch.tokens.is_cuda
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    settings = dict(batching=batching, temperature=1.0, true_vocab_size=spec.vocab_size)
    start = _now(on_cuda)
    batch.old_logprobs = compute_logprobs(model, batch, pg, **settings)
    middle = _now(on_cuda)
    metrics = train_minibatch(model, optimizer, scheduler, batch, LossConfig(), pg, **settings)
    end = _now(on_cuda)
    return StepTime(logprob_s=middle - start, update_s=end - middle,
                    useful_fraction=real_tokens / metrics.processed_tokens,
                    microbatches=int(metrics.microbatches),
                    peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None)


def _now(on_cuda: bool) -> float:
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def best_times(trainable, batch: TrainBatch, spec, pg, args) -> dict[str, StepTime]:
    """One warm-up step, then ``args.repeats`` rounds of all methods in turn; the fastest run
    of each method (its peak memory: the largest of its runs)."""
    plans = batchings(args)
    timed_step(trainable, batch, plans["packing"], spec, pg)
    runs: dict[str, list[StepTime]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:
            runs[name].append(timed_step(trainable, batch, plans[name], spec, pg,
                                         whole_width=name == "padded-step"))
    best = {name: min(times, key=lambda t: t.seconds) for name, times in runs.items()}
    if batch.tokens.is_cuda:
        for name, times in runs.items():
            best[name].peak_memory_gib = max(t.peak_memory_gib for t in times)
    return best


# ---- model FLOPs -----------------------------------------------------------------------------

def active_params(spec) -> int:
    """Parameters one token runs through: attention, router and top-k experts per layer, and
    the output layer (the embedding is a lookup)."""
    cfg = spec.config
    attention_width = cfg.num_attention_heads * cfg.kv_channels
    kv_width = cfg.num_query_groups * cfg.kv_channels
    attention = cfg.hidden_size * (attention_width + 2 * kv_width) + attention_width * cfg.hidden_size
    routed = cfg.hidden_size * cfg.num_moe_experts + cfg.moe_router_topk * 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    dense = 3 * cfg.hidden_size * cfg.ffn_hidden_size
    mlps = sum(routed if moe else dense for moe in spec.moe_layers)
    return len(spec.moe_layers) * attention + mlps + cfg.hidden_size * spec.vocab_size


def model_flops(spec, lengths: list[int]) -> float:
    """Useful FLOPs of one step (forward-only pass + update) over rows of these lengths; see
    the module docstring."""
    cfg = spec.config
    attention_width = cfg.num_attention_heads * cfg.kv_channels
    linear = active_params(spec) * sum(lengths)
    attention = cfg.num_layers * attention_width * sum(n * n for n in lengths)
    return (2 + 6) * (linear + attention)


# ---- report ----------------------------------------------------------------------------------

def summary(best: dict[str, StepTime], lengths: list[int], flops: float | None) -> dict[str, dict]:
    """Per method: the table's numbers (throughput and memory where ``flops`` is given)."""
    padded = best["padded-step"].seconds
    result = {}
    for name, step in best.items():
        row = dict(useful_fraction=round(step.useful_fraction, 4), microbatches=step.microbatches,
                   seconds=round(step.seconds, 3), logprob_seconds=round(step.logprob_s, 3),
                   update_seconds=round(step.update_s, 3), time_vs_padded_step=round(step.seconds / padded, 3))
        if flops is not None:
            row.update(tokens_per_s=round(sum(lengths) / step.seconds, 1),
                       model_tflops_per_s=round(flops / step.seconds / 1e12, 2),
                       peak_memory_gib=round(step.peak_memory_gib, 2))
        result[name] = row
    return result


def print_table(rows: dict[str, dict]) -> None:
    columns = [("method", None), ("useful-token fraction", "useful_fraction"), ("microbatches", "microbatches"),
               ("seconds", "seconds"), ("old log-probs s", "logprob_seconds"), ("update s", "update_seconds"),
               ("time / padded-step", "time_vs_padded_step")]
    if "tokens_per_s" in rows["padded"]:
        columns += [("tokens/s", "tokens_per_s"), ("model TFLOP/s", "model_tflops_per_s"),
                    ("peak memory GiB", "peak_memory_gib")]
    print("| " + " | ".join(title for title, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for name, row in rows.items():
        print("| " + " | ".join([name] + [str(row[key]) for _, key in columns[1:]]) + " |")


def describe_model(args) -> str:
    full = QWEN3_30B_A3B
    shrunk = [f"{what} {mine} of {real}" for what, mine, real in
              (("experts", args.experts, full["num_experts"]), ("vocabulary", args.vocab, full["vocab_size"]))
              if mine != real]
    note = f"; shrunk for this run: {', '.join(shrunk)}" if shrunk else ""
    return (f"model: Qwen3-30B-A3B widths, {args.layers} layer(s), {args.experts} experts of width "
            f"{full['moe_intermediate_size']} (top-{full['num_experts_per_tok']}), vocabulary {args.vocab}, "
            f"random weights, {args.dtype}{note}")


def main(argv=None) -> None:
    args = parse_args(argv)
    import megatron.core

    pg = single_rank_groups(args.device)
    spec = qwen3_moe.from_hf_config(hf_config(args), ParallelConfig(), params_dtype=DTYPES[args.dtype])
    trainable = build_trainable(spec, pg, total_steps=len(METHODS) * args.repeats + 1)
    lengths = row_lengths(args.rows, args.cap, args.seed)
    batch = random_batch(lengths, args.vocab, args.seed).to(args.device)
    print(describe_model(args))
    print(f"batch: {args.rows} rows, {sum(lengths)} real tokens, longest {max(lengths)}, median "
          f"{sorted(lengths)[len(lengths) // 2]}, {sum(n == args.cap for n in lengths)} at the cap {args.cap}; "
          f"padded: {args.micro_batch_size} rows per microbatch; budget B = {args.max_tokens} tokens")
    best = best_times(trainable, batch, spec, pg, args)
    flops = model_flops(spec, lengths) if args.device == "cuda" else None
    rows = summary(best, lengths, flops)
    print_table(rows)
    settings = dict(device=args.device, dtype=args.dtype, layers=args.layers, experts=args.experts,
                    vocab=args.vocab, rows=args.rows, cap=args.cap, micro_batch_size=args.micro_batch_size,
                    max_tokens=args.max_tokens, repeats=args.repeats, seed=args.seed, real_tokens=sum(lengths),
                    torch=torch.__version__, megatron_core=megatron.core.__version__)
    if flops is not None:
        settings.update(model_flops=flops, gpu=torch.cuda.get_device_name())
    print(json.dumps({**rows, "settings": settings}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
