"""Benchmark: Megatron -> SGLang weight sync by each path, against a raw copy of the same bytes.

Builds two random Qwen3-MoE checkpoints of a few hundred MB (hidden 1024, 2 layers, 32 experts
of width 768, vocabulary 32,000, every layer MoE), starts one CPU SGLang server on the first,
loads the second into Megatron at TP=2 on 2 spawned gloo ranks, and times, on those ranks and
in the same run, interleaved round by round (one warm-up round, then ``--reps`` timed ones):

* ``tensor``, ``distributed``, ``disk``: ``WeightSync.sync`` by that path (its own clock, from
  the first ``/begin_weight_update`` to the last ``/flush_cache``);
* ``gather only``: walking the HF tensors (TP gathers, layout transforms) and sending nothing:
  the part every path pays before a byte reaches the server;
* ``clone``: ``torch.clone`` of the tensors each rank owns after that walk, a plain memory
  copy of the synced bytes: the floor of the ``tensor`` and ``distributed`` paths;
* ``safetensors write+read``: each owner rank ``save_file``s its tensors, then rank 0
  ``load_file``s them all, as the server reloads the disk path's checkpoint: its floor.

The ratio column divides each path's time by its floor. Afterwards the server must score a fixed
sequence identically after every path, and differently from the weights it started with: the
three paths delivered the same bytes, and delivered them.

    .venv/bin/python tools/bench_weight_sync.py --reps 3 --workdir /tmp/megatron_sapo_bench_weight_sync
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests
import torch
import torch.distributed as dist

from megatron_sapo.config import WEIGHT_SYNC_METHODS

BENCH_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768,
                   num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                   num_experts=32, num_experts_per_tok=4, mlp_only_layers=[], max_position_embeddings=512)
SEQUENCE = [11, 250, 3, 3, 97, 140, 60, 8, 21, 299, 31000, 5]
PATHS = WEIGHT_SYNC_METHODS
FLOOR = {"tensor": "clone", "distributed": "clone", "disk": "safetensors write+read"}
METHODS = ("gather only", "clone", "safetensors write+read") + PATHS
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def served_logprobs(url: str) -> list[float]:
    out = requests.post(f"{url}/generate", json={
        "input_ids": SEQUENCE, "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
        "return_logprob": True, "logprob_start_len": 0}, timeout=300).json()
    return [entry[0] for entry in out["meta_info"]["input_token_logprobs"][1:]]


def timed(fn) -> float:
    """Seconds from all ranks starting ``fn`` to all ranks finishing it."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def safetensors_round_trip(owned: list[tuple[str, torch.Tensor]], folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    if owned:
        save_file(dict(owned), str(folder / f"rank{dist.get_rank()}.safetensors"))
    dist.barrier()
    if dist.get_rank() == 0:
        for file in sorted(folder.glob("*.safetensors")):
            load_file(file)


def load_trained_model(hf_dir: str, dtype: str, parallel, pg):
    """This rank's share of the Megatron model holding ``hf_dir``'s weights, its weight table and
    the HF config."""
    from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
    from megatron_sapo.convert.load import load_hf_into_model
    from megatron_sapo.models import qwen3_moe

    hf_config = qwen3_moe.read_hf_config(hf_dir)
    spec = qwen3_moe.from_hf_config(hf_config, parallel, params_dtype=DTYPES[dtype])
    model = qwen3_moe.build_model(spec, pg)
    table = qwen3_moe.weight_table(spec)
    load_hf_into_model(model, HFCheckpoint(hf_dir), table, pg)
    return model, table, hf_config


def owned_tensors(model, table, pg) -> tuple[list[tuple[str, torch.Tensor]], int, int]:
    """The HF tensors this rank owns, and the bytes and tensor count over all ranks."""
    from megatron_sapo.convert.export import iter_hf_tensors

    owned = [(name, t.contiguous()) for name, t in iter_hf_tensors(model, table, pg)]
    totals = torch.tensor([sum(t.numel() * t.element_size() for _, t in owned), len(owned)], dtype=torch.float64)
    dist.all_reduce(totals)
    return owned, int(totals[0]), int(totals[1])


def bench_rank(hf_dir: str, url: str, work: str, dtype: str, bucket_bytes: int, reps: int, port: int) -> None:
    from megatron_sapo.config import ParallelConfig
    from megatron_sapo.convert.export import iter_hf_tensors
    from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
    from megatron_sapo.rollout.weight_sync import ServerEndpoint, WeightSync

    parallel = ParallelConfig(tp=2)
    pg = initialize_model_parallel(parallel)
    try:
        model, table, hf_config = load_trained_model(hf_dir, dtype, parallel, pg)
        owned, total_bytes, total_tensors = owned_tensors(model, table, pg)
        raw = Path(work) / "raw"
        raw.mkdir(exist_ok=True)
        methods = {
            "gather only": lambda: sum(1 for _ in iter_hf_tensors(model, table, pg)),
            "clone": lambda: [t.clone() for _, t in owned],
            "safetensors write+read": lambda: safetensors_round_trip(owned, raw),
        }
        syncs = {path: WeightSync(model, table, pg, [ServerEndpoint(url)], path=path, bucket_bytes=bucket_bytes,
                                  hf_config=hf_config, disk_dir=Path(work) / "synced", master_port=port)
                 for path in PATHS}
        results = run_rounds(methods, syncs, url, reps)
        syncs["distributed"].close()
        if dist.get_rank() == 0:
            results["bytes"] = {m: results["bytes"].get(m, total_bytes) for m in METHODS}
            results["tensors"] = total_tensors
            (Path(work) / "results.json").write_text(json.dumps(results))
    finally:
        destroy_model_parallel()


def run_rounds(methods: dict, syncs: dict, url: str, reps: int) -> dict:
    """One warm-up round and ``reps`` timed ones, each timing every method and sync once; rank 0
    also records what the server scores after each path."""
    first = dist.get_rank() == 0
    seconds = {method: [] for method in METHODS}
    synced_bytes, served = {}, {"start": served_logprobs(url) if first else None}
    for round_ in range(reps + 1):
        for method, fn in methods.items():
            seconds[method].append(timed(fn))
        for path, sync in syncs.items():
            stats = sync.sync(f"bench-{path}-{round_}")
            seconds[path].append(stats.seconds)
            synced_bytes[path] = stats.bytes
            if first:
                served[path] = served_logprobs(url)
        if first:
            print(f"round {round_} done: " + ", ".join(f"{m} {s[-1]:.2f} s" for m, s in seconds.items()),
                  file=sys.stderr, flush=True)
    return {"seconds": seconds, "bytes": synced_bytes, "served": served}


def check_served(served: dict[str, list[float]]) -> tuple[float, float]:
    """(largest log-prob difference between the paths, largest change from the start weights);
    raises if the paths disagree or the weights did not change."""
    start = torch.tensor(served["start"])
    after = [torch.tensor(served[p]) for p in PATHS]
    between = max((a - after[0]).abs().max().item() for a in after)
    moved = (after[0] - start).abs().max().item()
    if between > 1e-5:
        raise RuntimeError(f"the paths left different weights on the server (log-probs differ by {between:.2e})")
    if moved < 1e-2:
        raise RuntimeError(f"the served weights did not change (log-probs moved by {moved:.2e})")
    return between, moved


def table(results: dict) -> str:
    timed_rounds = {m: s[1:] for m, s in results["seconds"].items()}
    median = {m: statistics.median(s) for m, s in timed_rounds.items()}
    lines = ["| path | bytes (MB) | seconds (median) | range (s) | first call (s) | GB/s | time / floor | floor |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        nbytes, seconds = results["bytes"][method], median[method]
        floor = FLOOR.get(method)
        ratio = f"{seconds / median[floor]:.1f}" if floor else "-"
        spread = f"{min(timed_rounds[method]):.2f}-{max(timed_rounds[method]):.2f}"
        lines.append(f"| {method} | {nbytes / 1e6:.0f} | {seconds:.2f} | {spread} | {results['seconds'][method][0]:.2f} | "
                     f"{nbytes / 1e9 / seconds:.2f} | {ratio} | {floor or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="checkpoint, Megatron parameter and served dtype")
    parser.add_argument("--bucket-mb", type=int, default=512, help="weight-sync bucket size (the trainer's default)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron_sapo_bench_weight_sync"))
    args = parser.parse_args()

    from megatron_sapo.models.tiny import save_tiny_qwen3_moe
    from megatron_sapo.parallel.spawn import spawn
    from megatron_sapo.rollout.manager import ServerManager
    from megatron_sapo.rollout.server import ServerOptions
    from megatron_sapo.training.setup import free_port

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print("writing the two checkpoints...", file=sys.stderr, flush=True)
    served_dir, trained_dir = (save_tiny_qwen3_moe(work / name, seed=seed, dtype=DTYPES[args.dtype], **BENCH_MODEL)
                               for name, seed in (("served", 0), ("trained", 1)))
    options = ServerOptions(model=str(served_dir), port=free_port(), dtype=args.dtype,
                            extra_args=["--skip-tokenizer-init"])
    print("starting the SGLang server...", file=sys.stderr, flush=True)
    with ServerManager([options], work / "logs") as manager:
        spawn(bench_rank, 2, str(trained_dir), manager.urls[0], str(work), args.dtype, args.bucket_mb * 2**20,
              args.reps, free_port())
    results = json.loads((work / "results.json").read_text())
    between, moved = check_served(results["served"])
    print(f"{results['tensors']} HF tensors, {args.dtype}, buckets of {args.bucket_mb} MiB, TP=2 on 2 gloo ranks, "
          f"median of {args.reps} rounds after a warm-up; served log-probs identical across paths "
          f"(max diff {between:.1e}) and moved by up to {moved:.2f} from the start weights\n")
    print(table(results))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
