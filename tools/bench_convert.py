"""Benchmark: streaming checkpoint conversion against a plain safetensors read+write.

Builds Qwen3-30B-A3B-shaped Hugging Face checkpoints (true widths: hidden 2048, 128 experts of
width 768, vocabulary 151,936, bf16) with few layers, then runs each step in a fresh process
and records wall time, throughput and peak RSS:

* ``hf-to-mcore``: ``megatron-sapo convert hf-to-mcore``
* ``mcore-to-hf``: ``megatron-sapo convert mcore-to-hf``
* ``safetensors copy``: ``load_file`` + ``save_file`` of every shard (the plain baseline)

Peak RSS that does not grow with the layer count is the point: conversion streams.

    .venv/bin/python tools/bench_convert.py --layers 2 6 --workdir /tmp/bench_convert
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=False, dtype="bfloat16",
)

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
# parent's peak (this script's, after it generated the checkpoint).
MEASURE = """
import sys
sys.argv = {argv!r}
{body}
print("PEAK_RSS_KB", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def hf_tensor_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Qwen3-MoE config, derived from the weight table."""
    from megatron_sapo.convert.streaming import meta_layout, param_shapes, single_rank_group
    from megatron_sapo.models import qwen3_moe

    with single_rank_group():
        spec, chunks, _ = meta_layout(hf_config, torch.bfloat16)
    table = qwen3_moe.weight_table(spec)
    shapes = {}
    for param, shape in param_shapes(chunks).items():
        match = table.match(param)
        names = match.entry.hf_names(match.layer, match.expert)
        for name, tensor in zip(names, match.entry.transform.to_hf(torch.empty(shape, device="meta"))):
            shapes[name] = tuple(tensor.shape)
    return shapes


def write_synthetic_checkpoint(out: Path, layers: int, seed: int = 0) -> int:
    """One safetensors file per layer plus one for embeddings/norm/head; returns total bytes."""
    config = {**QWEN3_30B_A3B, "num_hidden_layers": layers}
    shapes = hf_tensor_shapes(config)
    out.mkdir(parents=True)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        group = f"layer{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "other"
        groups.setdefault(group, []).append(name)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (group, names) in enumerate(sorted(groups.items())):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return total


def measured(argv: list[str], body: str) -> tuple[float, int]:
    """Run ``body`` in a fresh interpreter; return (seconds, peak RSS in bytes)."""
    code = MEASURE.format(argv=argv, body=body)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: failed\n{proc.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    return seconds, peak_kb * 1024


SHARD_GB = 1.0  # output shards of mcore-to-hf: the one buffer that is allowed to be large
CLI = "from megatron_sapo.cli import main\nrc = main(sys.argv[1:])\nassert rc == 0, rc"
COPY = """
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.glob("*.safetensors")):
    save_file(load_file(f), str(dst / f.name), metadata={"format": "pt"})
"""


def bench(layers: int, workdir: Path) -> list[tuple]:
    root = workdir / f"layers{layers}"
    shutil.rmtree(root, ignore_errors=True)
    print(f"[{layers} layers] writing the synthetic HF checkpoint...", file=sys.stderr, flush=True)
    size = write_synthetic_checkpoint(root / "hf", layers)
    steps = [
        ("hf-to-mcore", ["megatron-sapo", "convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out",
                         str(root / "mcore")], CLI),
        ("mcore-to-hf", ["megatron-sapo", "convert", "mcore-to-hf", "--mcore", str(root / "mcore"), "--out",
                         str(root / "back"), "--max-shard-size-gb", str(SHARD_GB)], CLI),
        ("safetensors copy", ["copy", str(root / "hf"), str(root / "copy")], COPY),
    ]
    rows = []
    for name, argv, body in steps:
        print(f"[{layers} layers] {name}...", file=sys.stderr, flush=True)
        seconds, peak = measured(argv, body)
        rows.append((layers, name, size, seconds, peak))
    shutil.rmtree(root)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron_sapo_bench_convert"))
    args = parser.parse_args()
    rows = [row for layers in args.layers for row in bench(layers, args.workdir)]
    copy_time = {layers: s for layers, name, _, s, _ in rows if name == "safetensors copy"}
    print("| layers | step | checkpoint (GB) | time (s) | GB/s | time / safetensors copy | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for layers, name, size, seconds, peak in rows:
        print(f"| {layers} | {name} | {size / 1e9:.2f} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | "
              f"{seconds / copy_time[layers]:.2f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
