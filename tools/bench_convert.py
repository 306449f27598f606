"""Benchmark: streaming checkpoint conversion against a plain safetensors read+write.

Builds Qwen3-30B-A3B-shaped Hugging Face checkpoints (true widths: hidden 2048, 128 experts of
width 768, vocabulary 151,936, bf16) with few layers, or Qwen3-VL-30B-A3B-shaped ones
(``--model qwen3-vl-30b-a3b``: the same text widths with each layer's experts stored fused in
the Hub orientation, plus the true 27-block vision tower), then runs each step in a fresh
process and records wall time, throughput and peak RSS:

* ``hf-to-mcore``: ``megatron-sapo convert hf-to-mcore``
* ``mcore-to-hf``: ``megatron-sapo convert mcore-to-hf``
* ``safetensors copy``: ``load_file`` + ``save_file`` of every shard (the plain baseline)

Peak RSS that does not grow with the layer count is the point: conversion streams.

    .venv/bin/python tools/bench_convert.py --layers 2 6 --workdir /tmp/bench_convert
    .venv/bin/python tools/bench_convert.py --model qwen3-vl-30b-a3b --layers 2 6
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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The Hub config.json files of Qwen3-30B-A3B and Qwen3-VL-30B-A3B-Instruct (the fields the
# conversion and the planner read), shipped beside their run configs.
QWEN3_30B_A3B = json.loads((EXAMPLES / "qwen3_30b_a3b" / "hf_config.json").read_text())
QWEN3_VL_30B_A3B = json.loads((EXAMPLES / "qwen3_vl_30b_a3b" / "hf_config.json").read_text())
MODELS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-vl-30b-a3b": QWEN3_VL_30B_A3B}

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
# parent's peak (this script's, after it generated the checkpoint).
MEASURE = """
import sys
sys.argv = {argv!r}
{body}
print("PEAK_RSS_KB", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def hf_tensor_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes as the Hub stores them (experts fused where the family fuses
    them), derived from the model's weight table."""
    from megatron_sapo.convert.hf_layout import ExpertName
    from megatron_sapo.convert.streaming import meta_layout, param_shapes, single_rank_group

    with single_rank_group():
        layout = meta_layout(hf_config, torch.bfloat16)
    table, fused = layout.table, layout.table.fused_experts
    shapes = {}
    for param, shape in param_shapes(layout.chunks).items():
        match = table.match(param)
        names = match.entry.hf_names(match.layer, match.expert)
        for name, tensor in zip(names, match.entry.transform.to_hf(torch.empty(shape, device="meta"))):
            expert = ExpertName.parse(name) if fused is not None else None
            if expert is None:
                shapes[name] = tuple(tensor.shape)
            else:
                shapes[expert.stored] = fused.hub_shape(expert.kind)
    return shapes


def with_layers(config: dict, layers: int) -> dict:
    if "text_config" in config:
        return {**config, "text_config": {**config["text_config"], "num_hidden_layers": layers}}
    return {**config, "num_hidden_layers": layers}


def file_group(name: str) -> str:
    """One file per text layer (``...layers.{i}.``), one for everything else."""
    parts = name.split(".")
    if "layers" in parts and "visual" not in parts:
        return f"layer{int(parts[parts.index('layers') + 1]):03d}"
    return "other"


def write_synthetic_checkpoint(out: Path, config: dict, seed: int = 0) -> int:
    """One safetensors file per layer plus one for the rest; returns total bytes."""
    shapes = hf_tensor_shapes(config)
    out.mkdir(parents=True)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(file_group(name), []).append(name)
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


def bench(model: str, layers: int, workdir: Path) -> list[tuple]:
    root = workdir / f"{model}-layers{layers}"
    shutil.rmtree(root, ignore_errors=True)
    print(f"[{layers} layers] writing the synthetic HF checkpoint...", file=sys.stderr, flush=True)
    size = write_synthetic_checkpoint(root / "hf", with_layers(MODELS[model], layers))
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
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron_sapo_bench_convert"))
    args = parser.parse_args()
    rows = [row for layers in args.layers for row in bench(args.model, layers, args.workdir)]
    copy_time = {layers: s for layers, name, _, s, _ in rows if name == "safetensors copy"}
    print("| layers | step | checkpoint (GB) | time (s) | GB/s | time / safetensors copy | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for layers, name, size, seconds, peak in rows:
        print(f"| {layers} | {name} | {size / 1e9:.2f} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | "
              f"{seconds / copy_time[layers]:.2f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
