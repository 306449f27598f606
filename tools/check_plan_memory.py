"""The planner's predicted peak against a measured training step, on one device.

For each setting the trainer's own RL step (old log-probs, then ``train.minibatches`` updates
with their optimizer steps) runs on a Qwen3-30B-A3B-shaped model with random weights, built from
the shipped config.json with ``--layers`` layers (and ``--experts`` / ``--vocab`` when given),
and its peak tensor memory is measured: ``torch.cuda.max_memory_allocated`` on CUDA, the
profiler's CPU allocator events on CPU (``megatron_sapo/plan/measure.py``). The plan of the same
config for that device (local layer spec: TransformerEngine is not installed where this runs;
torch's Adam) gives the predicted peak of tensors, the allocator reserve left out. Each setting
runs in its own process, so one setting's model cannot stay behind in the next one's memory.

Settings (rows at the length named, all at it, as the planner assumes):

* ``packed-full``: rows of ``--seq``, packed into ``2 x --seq``-token microbatches, full recompute;
* ``budget-none``: rows of ``--seq / 2`` under a ``--seq`` token budget (2 rows per microbatch), no recompute;
* ``rows-selective``: 2 rows of ``--seq / 4`` per microbatch, selective recompute.

The last line printed is one JSON object: per setting the planned and measured GiB, their ratio
and the moment the plan puts the peak at.

    python3 tools/check_plan_memory.py --device cuda --layers 4 --seq 4096     # tools/gpu_check.sh
    .venv/bin/python tools/check_plan_memory.py --device cpu --layers 1 --experts 16 --vocab 32768 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("packed-full", "budget-none", "rows-selective")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where the step runs")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has 48)")
    parser.add_argument("--experts", type=int, default=128, help="experts per layer")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=4096, help="row length of the packed setting")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # a child's setting
    return parser.parse_args(argv)


def model_config(args) -> dict:
    hf = json.loads((REPO / "examples" / "qwen3_30b_a3b" / "hf_config.json").read_text())
    return {**hf, "num_hidden_layers": args.layers, "num_experts": args.experts, "vocab_size": args.vocab}


def run_config(setting: str, seq: int, hf_dir: str):
    from megatron_sapo.config_file import config_from_dict

    row, train, parallel = {
        "packed-full": (seq, dict(max_tokens_per_microbatch=2 * seq, pack_sequences=True), dict(recompute="full")),
        "budget-none": (seq // 2, dict(max_tokens_per_microbatch=seq), {}),
        "rows-selective": (seq // 4, dict(micro_batch_size=2), dict(recompute="selective")),
    }[setting]
    raw = dict(model=dict(hf_dir=hf_dir, params_dtype="bf16", transformer_impl="local"), parallel=parallel,
               rollout=dict(prompts_per_step=2, group_size=4, max_new_tokens=row - 16),
               train=dict(minibatches=2, max_seq_len=row, out_dir="unused", **train),
               data=dict(task="tiny-reverse", max_prompt_tokens=16))
    return config_from_dict(raw), row


def one_setting(args) -> dict:
    """Plan, then measure, one setting in this process."""
    import tempfile

    import torch
    import torch.distributed as dist

    from megatron_sapo.parallel.groups import initialize_model_parallel
    from megatron_sapo.parallel.ports import free_port
    from megatron_sapo.plan.layout import Hardware
    from megatron_sapo.plan.measure import measure_step
    from megatron_sapo.plan.planner import GIB, plan_run

    hf = model_config(args)
    with tempfile.TemporaryDirectory() as hf_dir:
        Path(hf_dir, "config.json").write_text(json.dumps(hf))
        cfg, row = run_config(args.one, args.seq, hf_dir)
        memory = torch.cuda.get_device_properties(0).total_memory / GIB if args.device == "cuda" else 64.0
        plan = plan_run(cfg, Hardware(nodes=1, gpus_per_node=1, gpu_memory_gib=memory), device=args.device, te=False)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    port = free_port()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    pg = initialize_model_parallel(cfg.parallel)
    measured = measure_step(cfg, hf, [row] * cfg.rollout.samples_per_step, pg, device=args.device)
    dist.destroy_process_group()
    stage = plan.stages[0]
    return dict(setting=args.one, row=row, microbatch=[stage.shape.rows, stage.shape.seq],
                planned_gib=round(stage.tensor_peak / GIB, 3), measured_gib=round(measured.peak_bytes / GIB, 3),
                ratio=round(stage.tensor_peak / measured.peak_bytes, 3), moment=stage.moment,
                planned_gib_by_item={k: round(v / GIB, 3) for k, v in stage.breakdown.items()},
                method=measured.method)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one_setting(args)))
        return 0
    rows, status = {}, 0
    base = [sys.executable, __file__, "--device", args.device, "--layers", str(args.layers), "--experts",
            str(args.experts), "--vocab", str(args.vocab), "--seq", str(args.seq)]
    for setting in args.settings:
        done = subprocess.run([*base, "--one", setting], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
        result = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not result:
            print(f"{setting}: failed\n{done.stdout[-3000:]}{done.stderr[-3000:]}", file=sys.stderr)
            status = 1
            continue
        rows[setting] = json.loads(result[-1])
        r = rows[setting]
        print(f"{setting:<15} microbatch {r['microbatch'][0]} x {r['microbatch'][1]:<6} planned {r['planned_gib']:8.2f} "
              f"GiB  measured {r['measured_gib']:8.2f} GiB  ratio {r['ratio']:.3f}  ({r['moment']})", flush=True)
    print(json.dumps({"settings": rows, "device": args.device, "layers": args.layers, "experts": args.experts,
                      "vocab": args.vocab, "seq": args.seq}))
    return status


if __name__ == "__main__":
    sys.exit(main())
