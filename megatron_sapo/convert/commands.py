"""`megatron-sapo convert hf-to-mcore | mcore-to-hf`: checkpoint conversion on spawned ranks.

Inputs are checked in the calling process (architecture, files, output folder) so mistakes
are reported before any rank starts. Each rank builds its share of the Megatron model for the
requested layout, so no process ever holds more than its shard plus the tensor in flight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo.config import ConfigError, ParallelConfig
from megatron_sapo.convert import mcore_checkpoint
from megatron_sapo.convert.export import export_hf
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.models import qwen3_moe
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.parallel.spawn import spawn, world_size_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")


def hf_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"config.json: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_rank_model(hf_config: dict, parallel: ParallelConfig, dtype: torch.dtype):
    pg = initialize_model_parallel(parallel)
    spec = qwen3_moe.from_hf_config(hf_config, parallel, params_dtype=dtype)
    model = qwen3_moe.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp))
    return model, spec, pg


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=dist.get_rank() != 0, file=sys.stderr)


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")


def hf_to_mcore(args: argparse.Namespace) -> int:
    hf_dir, out = Path(args.hf), Path(args.out)
    hf_config = qwen3_moe.read_hf_config(hf_dir)
    qwen3_moe.check_architecture(hf_config, str(hf_dir / "config.json"))
    HFCheckpoint(hf_dir)  # index and shard files present
    _check_output(out, args.force)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    dtype = DTYPES[args.dtype] if args.dtype else hf_dtype(hf_config)
    spawn(_hf_to_mcore_rank, world_size_for(parallel), hf_dir, out, hf_config, parallel, dtype, args.force)
    print(f"wrote Megatron checkpoint {out} (written at tp={args.tp} pp={args.pp} ep={args.ep}; loads at any layout)")
    return 0


def _hf_to_mcore_rank(hf_dir, out, hf_config, parallel, dtype, force):
    model, spec, pg = build_rank_model(hf_config, parallel, dtype)
    params = sum(1 for _ in model.named_parameters())
    with _progress(params, "loading HF tensors (rank 0)") as bar:
        load_hf_into_model(model, HFCheckpoint(hf_dir), qwen3_moe.weight_table(spec), pg, progress=bar)
    mcore_checkpoint.save_model(model, out, hf_config, force=force, extra_files_from=hf_dir)
    destroy_model_parallel()


def mcore_to_hf(args: argparse.Namespace) -> int:
    ckpt, out = Path(args.mcore), Path(args.out)
    hf_config = mcore_checkpoint.read_hf_config(ckpt)
    qwen3_moe.check_architecture(hf_config, str(ckpt / mcore_checkpoint.HF_CONFIG_FILE))
    _check_output(out, args.force)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    dtype = DTYPES[args.dtype] if args.dtype else hf_dtype(hf_config)
    max_bytes = int(args.max_shard_size_gb * 2**30)
    spawn(_mcore_to_hf_rank, world_size_for(parallel), ckpt, out, hf_config, parallel, dtype, max_bytes, args.force)
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def _mcore_to_hf_rank(ckpt, out, hf_config, parallel, dtype, max_bytes, force):
    model, spec, pg = build_rank_model(hf_config, parallel, dtype)
    mcore_checkpoint.load_model(model, ckpt)
    table = qwen3_moe.weight_table(spec)
    hf_tensors = sum(len(table.match(name).entry.hf) for name, _ in model.named_parameters())
    with _progress(hf_tensors, "writing HF tensors (rank 0)") as bar:
        export_hf(model, table, pg, out, hf_config, dtype=dtype, max_shard_bytes=max_bytes,
                  extra_files_from=ckpt, force=force, progress=bar)
    destroy_model_parallel()


def register(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-Core")
    directions = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_mcore = directions.add_parser(
        "hf-to-mcore", help="HF Qwen3-MoE folder -> Megatron-Core distributed checkpoint (torch_dist)")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint folder")
    add_layout_args(to_mcore)
    to_mcore.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: config.json's)")
    to_mcore.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_mcore.set_defaults(func=hf_to_mcore)

    to_hf = directions.add_parser("mcore-to-hf", help="Megatron-Core checkpoint -> HF folder (safetensors + index)")
    to_hf.add_argument("--mcore", required=True, help="checkpoint folder written by hf-to-mcore or training")
    to_hf.add_argument("--out", required=True, help="output Hugging Face folder")
    add_layout_args(to_hf)
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="written dtype (default: config.json's)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    to_hf.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_hf.set_defaults(func=mcore_to_hf)
