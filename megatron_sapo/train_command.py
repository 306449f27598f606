"""``megatron-sapo train CONFIG``: the main job.

Under a launcher (torchrun, srun, mpirun) every launched process is a rank. Run plainly, the
command starts the ranks one copy of the model needs (TP x PP, or the expert layout's size)
itself, so the CPU demo is one command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_sapo.config import RunConfig
from megatron_sapo.config_file import load_config

if TYPE_CHECKING:
    from megatron_sapo.training.stop import Stopped

LAUNCHER_VARIABLES = ("RANK", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="run RL training (SAPO, GRPO, GSPO, with or without routing replay) from a TOML config",
        description="Run RL training. Outputs (resolved config.toml, metrics.jsonl, TensorBoard events, "
                    "checkpoints, server logs) go to --output, or train.out_dir of the config.")
    parser.add_argument("config", help="TOML run configuration (see examples/)")
    parser.add_argument("--output", help="output folder (overrides train.out_dir)")
    parser.add_argument("--steps", type=int, help="total RL steps (overrides train.steps)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (overrides checkpoint.save_every)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set loss.tau_neg=1.0")
    parser.add_argument("--no-plan-check", action="store_true",
                        help="on GPU machines, start even when `megatron-sapo plan` says the run does not fit")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the HF checkpoint the run starts from (a built-in model, after its supervised "
                             "cold start: OUTPUT/start_model) and print its path, then stop; rollout nodes serve it "
                             "in disaggregated runs (examples/slurm/launch_rl.sh)")
    parser.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    overrides = list(args.set)
    if args.output:
        overrides.append(f"train.out_dir={args.output}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"checkpoint.save_every={args.save_every}")
    cfg = load_config(args.config, overrides)
    return cfg, Path(cfg.train.out_dir)


def check_plan(cfg: RunConfig) -> None:
    """On a GPU machine, refuse a run whose plan does not fit these GPUs (``plan/command.py``),
    before any process group, model or server starts. The job is the launcher's (its world and
    ranks per host, read as ``init_distributed`` reads them), else the ranks this command would
    start on this machine. Every rank plans; rank 0 prints the breakdown."""
    from megatron_sapo.plan.command import check_fits, local_gpus
    from megatron_sapo.plan.layout import Hardware

    local = local_gpus()
    if local is None:  # a CPU machine: no GPU memory to hold the plan to
        return
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        from megatron_sapo.parallel.launch import detect_launch

        launch = detect_launch()
        rank, world, per_host = launch.rank, launch.world_size, launch.local_world_size
    else:
        from megatron_sapo.parallel.spawn import world_size_for

        rank, world = 0, world_size_for(cfg.parallel)
        per_host = world
    # Hosts of equal size when they divide the world; the plan needs only the world's size.
    nodes, per_node = (world // per_host, per_host) if world % per_host == 0 else (1, world)
    hardware = Hardware(nodes=nodes, gpus_per_node=per_node, gpu_memory_gib=local[1],
                        memory_source=f"this machine's {local[2]}")
    check_fits(cfg, hardware, verbose=rank == 0)


def run(args: argparse.Namespace) -> int:
    from megatron_sapo import console

    console.quiet_known_warnings()
    started = time.monotonic()
    cfg, out_dir = resolve(args)
    if args.prepare_only:
        from megatron_sapo.training.setup import prepare_start_model

        print(prepare_start_model(cfg, out_dir))
        return 0
    if args.resume and not (out_dir / "checkpoints" / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
    if not args.no_plan_check:
        check_plan(cfg)
    if cfg.model.hf_dir is not None:
        from megatron_sapo.convert.hf_checkpoint import HFCheckpoint

        HFCheckpoint(cfg.model.hf_dir).check()  # a corrupt file fails here, naming itself
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        from megatron_sapo.parallel.launch import init_distributed

        launch = init_distributed()
        rank = launch.rank
        if rank == 0:
            print(console.header(cfg, launch.world_size, out_dir), flush=True)
        stopped = _rank_main(cfg, out_dir, args.resume)
        if rank != 0:  # rank 0 reports for all
            return stopped.exit_status if stopped else 0
    else:
        from megatron_sapo.parallel.spawn import spawn, world_size_for
        from megatron_sapo.training.stop import STOP_SIGNALS

        print(console.header(cfg, world_size_for(cfg.parallel), out_dir), flush=True)
        stopped = spawn(_rank_main, world_size_for(cfg.parallel), cfg, out_dir, args.resume,
                        forward_signals=STOP_SIGNALS)  # rank 0's answer
    if stopped is not None:
        from megatron_sapo.training.checkpoint import find_latest

        latest = find_latest(out_dir / "checkpoints")
        where = (f"latest checkpoint {latest}; run the same command with --resume to continue" if latest
                 else "no checkpoint was saved")
        print(f"stopped by {stopped.cause}: {where}", file=sys.stderr)
        return stopped.exit_status
    print(console.summary(out_dir, time.monotonic() - started))
    print(f"done: metrics in {out_dir / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {out_dir / 'tensorboard'}")
    return 0


def _rank_main(cfg: RunConfig, out_dir: Path, resume: bool) -> Stopped | None:
    from megatron_sapo import console
    from megatron_sapo.loop import train

    console.quiet_known_warnings()  # a spawned rank is a fresh interpreter

    return train(cfg, out_dir, resume=resume)
