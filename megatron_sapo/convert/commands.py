"""`megatron-sapo convert hf-to-mcore | mcore-to-hf`: streaming checkpoint conversion.

Inputs are checked first (architecture, files, output folder, that the model splits the way
it will run); the conversion itself streams one tensor at a time (see ``streaming.py``), so
memory does not grow with the model. ``--transformer-impl`` picks the layer spec whose
checkpoint keys are written or read, as ``model.transformer_impl`` does for training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_sapo.config import TRANSFORMER_IMPLS, ConfigError, ParallelConfig
from megatron_sapo.convert import mcore_checkpoint, streaming
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.hf_layout import FusedExperts, logical_view
from megatron_sapo.convert.output import check_target
from megatron_sapo.models import model_family, read_hf_config, use_transformer_engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")


def add_transformer_impl_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="auto",
                        help="Megatron layer spec: TransformerEngine (needs CUDA and transformer_engine), local, "
                             "or auto: TransformerEngine where available (default auto)")


def transformer_engine_of(args: argparse.Namespace) -> bool:
    """Whether the command builds the TransformerEngine spec (errors name the flag)."""
    return use_transformer_engine(args.transformer_impl, key="--transformer-impl")


def hf_dtype(hf_config: dict) -> torch.dtype:
    """The checkpoint's dtype: config.json's, else its text model's (vision-language configs)."""
    sections = (hf_config, hf_config.get("text_config") or {})
    name = next((c.get(k) for c in sections for k in ("dtype", "torch_dtype") if c.get(k)), "float32")
    if name not in DTYPES:
        raise ConfigError(f"config.json: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)


def hf_to_mcore(args: argparse.Namespace) -> int:
    hf_dir, out = Path(args.hf), Path(args.out)
    hf_config = read_hf_config(hf_dir)
    family = model_family(hf_config, str(hf_dir / "config.json"))
    checkpoint = HFCheckpoint(hf_dir)  # index and shard files present
    check_target(out, args.force)
    # The checkpoint is layout-free; the flags check that the model splits the way it will be run.
    spec = family.from_hf_config(hf_config, ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep))
    use_te = transformer_engine_of(args)
    dtype = DTYPES[args.dtype] if args.dtype else hf_dtype(hf_config)
    tensors = len(logical_view(checkpoint, FusedExperts.of(spec)).names())
    with _progress(tensors, "reading HF tensors") as bar:
        streaming.hf_to_mcore(hf_dir, out, hf_config, dtype, force=args.force, progress=bar, use_te=use_te)
    print(f"wrote Megatron checkpoint {out} (torch_dist; loads at any TP/PP/EP)")
    return 0


def mcore_to_hf(args: argparse.Namespace) -> int:
    ckpt, out = Path(args.mcore), Path(args.out)
    hf_config = mcore_checkpoint.read_hf_config(ckpt)
    model_family(hf_config, str(ckpt / mcore_checkpoint.HF_CONFIG_FILE))
    check_target(out, args.force)
    use_te = transformer_engine_of(args)
    dtype = DTYPES[args.dtype] if args.dtype else hf_dtype(hf_config)
    with _progress(None, "writing HF tensors") as bar:
        streaming.mcore_to_hf(ckpt, out, hf_config, dtype, max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                              force=args.force, progress=bar, use_te=use_te)
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def register(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-Core")
    directions = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_mcore = directions.add_parser(
        "hf-to-mcore", help="HF Qwen3-MoE / Qwen3-VL-MoE folder -> Megatron-Core distributed checkpoint (torch_dist)")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint folder")
    add_layout_args(to_mcore)  # checked against the model; the checkpoint itself loads at any layout
    add_transformer_impl_arg(to_mcore)  # the checkpoint's keys are that spec's
    to_mcore.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: config.json's)")
    to_mcore.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_mcore.set_defaults(func=hf_to_mcore)

    to_hf = directions.add_parser("mcore-to-hf", help="Megatron-Core checkpoint -> HF folder (safetensors + index)")
    to_hf.add_argument("--mcore", required=True, help="checkpoint folder written by hf-to-mcore or training")
    to_hf.add_argument("--out", required=True, help="output Hugging Face folder")
    add_transformer_impl_arg(to_hf)  # the spec whose keys the checkpoint has
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="written dtype (default: config.json's)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    to_hf.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_hf.set_defaults(func=mcore_to_hf)
