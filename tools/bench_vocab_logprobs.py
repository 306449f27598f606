"""Benchmark: per-token log-probs + entropy from vocabulary-sharded logits, three ways.

Methods (each does forward and backward of ``sum(logp) + 0.01 * sum(entropy)``):

* ``megatron_sapo``: ``vocab_parallel_logprobs(..., entropy=True)``, one op, no vocab gather.
* ``gather_full``: all-gather the vocabulary shards, then ``log_softmax`` over the full vocab.
* ``megatron_ce``: Megatron-Core's ``vocab_parallel_cross_entropy`` (on a clone: it overwrites
  its input in place) plus a separate vocab-parallel entropy built from Megatron's
  ``reduce_from_tensor_model_parallel_region``.

CPU (default): 2 gloo ranks, each holding half of the vocabulary; every method runs in its own
pair of fresh processes so that its peak RSS is its own. Peak extra memory is the peak RSS
during the timed calls minus the RSS just before them (logits already allocated).
CUDA (``--device cuda``, one GPU): one rank with the whole vocabulary; peak extra memory from
``torch.cuda.max_memory_allocated``.

    .venv/bin/python tools/bench_vocab_logprobs.py --tokens 1024
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

METHODS = ("megatron_sapo", "gather_full", "megatron_ce")


def run_ours(shard, targets, group):
    from megatron_sapo.parallel import vocab_parallel_logprobs

    return vocab_parallel_logprobs(shard, targets, group, entropy=True)


def run_gather(shard, targets, group):
    import torch.distributed.nn.functional as dist_fn

    full = torch.cat(dist_fn.all_gather(shard, group=group), dim=-1) if group is not None else shard
    logsm = torch.log_softmax(full.float(), dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logsm.exp() * logsm).sum(-1)


def run_megatron(shard, targets, group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = shard.float()
    row_max = z.detach().amax(-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    z = z - row_max
    e = z.exp()
    norm = reduce_from_tensor_model_parallel_region(e.sum(-1))
    entropy = norm.log() - reduce_from_tensor_model_parallel_region((e * z).sum(-1)) / norm
    logp = -vocab_parallel_cross_entropy(shard.clone(), targets)
    return logp, entropy


RUNNERS = {"megatron_sapo": run_ours, "gather_full": run_gather, "megatron_ce": run_megatron}


def make_inputs(tokens, vocab, rank, world, dtype, device):
    width = vocab // world
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    shard = torch.randn(tokens, width, generator=g, device=device, dtype=torch.float32).to(dtype)
    g_targets = torch.Generator(device=device).manual_seed(7)
    targets = torch.randint(0, width * world, (tokens,), generator=g_targets, device=device)
    return shard.requires_grad_(True), targets


def timed_steps(method, shard, targets, group, reps, sync):
    times = []
    for i in range(reps + 1):  # the first call warms up
        shard.grad = None
        sync()
        start = time.perf_counter()
        logp, entropy = RUNNERS[method](shard, targets, group)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_worker(rank, world, method, args, init_file, out_file):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    if method == "megatron_ce":
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        group = parallel_state.get_tensor_model_parallel_group()
    shard, targets = make_inputs(args.tokens, args.vocab, rank, world, getattr(torch, args.dtype), "cpu")
    before = _rss_bytes()
    seconds = timed_steps(method, shard, targets, group, args.reps, sync=lambda: dist.barrier(group))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = torch.tensor([seconds, float(peak - before)], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        shard_bytes = shard.numel() * shard.element_size()
        with open(out_file, "w") as f:
            f.write(f"{stats[0].item()} {stats[1].item()} {shard_bytes}")
    dist.destroy_process_group()


def bench_cpu(args):
    rows = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
            torch.multiprocessing.spawn(cpu_worker, args=(2, method, args, init_file, out_file), nprocs=2)
            with open(out_file) as f:
                seconds, extra, shard_bytes = (float(x) for x in f.read().split())
        rows[method] = (seconds, extra, shard_bytes)
        print(f"  {method}: {seconds * 1e3:.1f} ms, peak extra {extra / 2**20:.0f} MiB", file=sys.stderr)
    return rows, f"CPU, 2 gloo ranks x {max(1, (os.cpu_count() or 2) // 2)} thread(s)"


def bench_cuda(args):
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    group = parallel_state.get_tensor_model_parallel_group()
    rows = {}
    for method in args.methods:
        shard, targets = make_inputs(args.tokens, args.vocab, 0, 1, getattr(torch, args.dtype), "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = timed_steps(method, shard, targets, None if method == "megatron_sapo" else group, args.reps,
                              sync=torch.cuda.synchronize)
        extra = torch.cuda.max_memory_allocated() - before
        rows[method] = (seconds, float(extra), shard.numel() * shard.element_size())
        del shard, targets
        torch.cuda.empty_cache()
    return rows, f"{torch.cuda.get_device_name()}, 1 rank (whole vocabulary)"


def table(rows, where, args) -> str:
    base_time = rows["megatron_ce"][0] if "megatron_ce" in rows else None
    lines = [
        f"{args.tokens} tokens, vocabulary {args.vocab:,}, {args.dtype} logits, {where}; "
        f"fwd+bwd of log-probs and entropy, median of {args.reps}",
        "",
        "| method | time (ms) | time / megatron_ce | peak extra memory (MiB) | in logits shards |",
        "|---|---|---|---|---|",
    ]
    for method, (seconds, extra, shard_bytes) in rows.items():
        ratio = f"{seconds / base_time:.2f}" if base_time else "-"
        lines.append(f"| {method} | {seconds * 1e3:.1f} | {ratio} | {extra / 2**20:.0f} | {extra / shard_bytes:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    warnings.filterwarnings("ignore")
    rows, where = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    print(table(rows, where, args))


if __name__ == "__main__":
    main()
