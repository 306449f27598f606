"""`megatron-sapo parity`: the Megatron model against transformers on the same tokens.

Spawns the ranks of the requested layout, loads the Megatron checkpoint, runs both models in
the same dtype (fp32 by default; on the GPU when there is one) on seeded random tokens and
prints a JSON object whose last line holds
``max_abs_logit_diff`` (over the true vocabulary) and the max difference of each layer's
output hidden states (the last entry is after the final norm, as transformers reports it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo import torchvision_compat
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert import mcore_checkpoint
from megatron_sapo.convert.commands import DTYPES, add_layout_args
from megatron_sapo.models import qwen3_moe
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.parallel.spawn import spawn, world_size_for
from megatron_sapo.training.forward import forward_logits


def parity(args: argparse.Namespace) -> int:
    hf_dir, ckpt = Path(args.hf), Path(args.mcore)
    hf_config = qwen3_moe.read_hf_config(hf_dir)
    qwen3_moe.check_architecture(hf_config, str(hf_dir / "config.json"))
    if mcore_checkpoint.read_hf_config(ckpt) != hf_config:
        print(f"warning: {ckpt}/{mcore_checkpoint.HF_CONFIG_FILE} differs from {hf_dir}/config.json", flush=True)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    if args.seq_len % args.tp:
        raise SystemExit(f"--seq-len {args.seq_len} must be divisible by --tp {args.tp} (sequence parallelism)")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "parity.json"
        spawn(_parity_rank, world_size_for(parallel), hf_dir, ckpt, hf_config, parallel, args.seq_len, args.seed,
              DTYPES[args.dtype], result_file)
        report = json.loads(result_file.read_text())
    print(json.dumps(report))
    return 0


def _tokens(vocab: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))


def _build_rank_model(hf_config: dict, parallel: ParallelConfig, dtype: torch.dtype):
    """This rank's share of the model: TransformerEngine spec where CUDA and TE are present."""
    pg = initialize_model_parallel(parallel)
    use_te = qwen3_moe.te_available()
    spec = qwen3_moe.from_hf_config(hf_config, parallel, params_dtype=dtype, use_te=use_te)
    model = qwen3_moe.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp), use_te=use_te)
    return model, spec, pg


def _parity_rank(hf_dir, ckpt, hf_config, parallel, seq_len, seed, dtype, result_file):
    model, spec, pg = _build_rank_model(hf_config, parallel, dtype)
    mcore_checkpoint.load_model(model, ckpt)
    tokens = _tokens(spec.vocab_size, seq_len, seed).to(next(model.parameters()).device)
    hidden = _record_layer_outputs(model, pg)
    logits = forward_logits(model, tokens, pg)
    if logits is not None:
        logits = all_gather_cat(logits, pg.tp, dim=-1)[..., : spec.vocab_size].float().cpu()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (hidden, logits))
    if dist.get_rank() == 0:
        megatron_hidden = {k: v for part, _ in gathered for k, v in part.items()}
        megatron_logits = next(lg for _, lg in gathered if lg is not None)
        report = _compare(hf_dir, tokens, megatron_logits, megatron_hidden, dtype)
        report.update(tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, tokens=seq_len, dtype=str(dtype).split(".")[-1],
                      device=tokens.device.type)
        Path(result_file).write_text(json.dumps(report))
    destroy_model_parallel()


def _record_layer_outputs(model, pg) -> dict:
    """Hooks that store each layer's output ``[B, S, H]`` (sequence gathered under SP) by global index."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    store: dict[int | str, torch.Tensor] = {}
    offset = get_transformer_layer_offset(model.config, vp_stage=None, pp_rank=dist.get_rank(pg.pp))

    def keep(key):
        def hook(module, inputs, output):
            tensor = (output[0] if isinstance(output, tuple) else output).detach()
            # Under sequence parallelism each TP rank holds a slice of the sequence (dim 0).
            if model.config.sequence_parallel:
                tensor = all_gather_cat(tensor, pg.tp, dim=0)
            store[key] = tensor.transpose(0, 1).float().cpu()
        return hook

    for index, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(keep(offset + index))
    if model.decoder.final_layernorm is not None:
        model.decoder.final_layernorm.register_forward_hook(keep("final_norm"))
    return store


def _compare(hf_dir, tokens, megatron_logits, megatron_hidden, dtype) -> dict:
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(tokens.device).eval()
    with torch.no_grad():
        out = reference(tokens, output_hidden_states=True)
    layers = sorted(k for k in megatron_hidden if isinstance(k, int))
    diffs = []
    for index in layers[:-1]:
        diffs.append((megatron_hidden[index] - out.hidden_states[index + 1].float().cpu()).abs().max().item())
    diffs.append((megatron_hidden["final_norm"] - out.hidden_states[-1].float().cpu()).abs().max().item())
    return {
        "max_abs_logit_diff": (megatron_logits - out.logits.float().cpu()).abs().max().item(),
        "hidden_state_max_abs_diff": diffs,
    }


def register(sub) -> None:
    p = sub.add_parser("parity", help="compare the Megatron model's logits with transformers (prints JSON)")
    p.add_argument("--hf", required=True, help="Hugging Face model folder")
    p.add_argument("--mcore", required=True, help="Megatron checkpoint folder of the same model")
    add_layout_args(p)
    p.add_argument("--seq-len", type=int, default=32, help="tokens in the test sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test tokens (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both models (default float32)")
    p.set_defaults(func=parity)


__all__ = ["parity", "register"]
