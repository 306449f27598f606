"""`megatron-sapo parity`: the Megatron model against transformers on the same inputs.

Spawns the ranks of the requested layout, loads the Megatron checkpoint, runs both models in
the same dtype (fp32 by default; on the GPU when there is one) and prints a JSON object whose
last line holds ``max_abs_logit_diff`` (over the true vocabulary) and the max difference of
each layer's output hidden states (the last entry is after the final norm, as transformers
reports it). The Megatron model's layer spec (``--transformer-impl``, resolved as training
resolves ``model.transformer_impl``) is printed first (``spec: local``) and is the report's
``transformer_impl``: a parity figure holds for the spec it was measured with.

Inputs: a text model reads seeded random tokens. A vision-language model (a spec with a
vision tower) reads an image (``--image FILE``, or a built-in seeded synthetic one) and a
short text, prepared by the processor saved with the model, and is compared with
transformers' ``AutoModelForImageTextToText`` (``Qwen3VLMoeForConditionalGeneration``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sapo import torchvision_compat
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert import mcore_checkpoint
from megatron_sapo.convert.commands import DTYPES, add_layout_args, add_transformer_impl_arg, transformer_engine_of
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.errors import InputError
from megatron_sapo.models import model_family, read_hf_config
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.parallel.spawn import spawn, world_size_for
from megatron_sapo.training.forward import forward_logits
from megatron_sapo.types import VisionInputs

# The text around the image; the special tokens are Qwen3-VL's (the processor expands the
# image placeholder to the image's tokens).
IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                "<|im_start|>assistant\n")


@dataclass(frozen=True)
class ParityInputs:
    """What both models read: one row of tokens, and its images for a vision-language model."""

    tokens: torch.Tensor
    """``[1, S]`` token ids."""
    vision: VisionInputs | None = None
    processed: dict[str, torch.Tensor] | None = None
    """Everything the processor returned (transformers' forward also takes its token types)."""

    def reference_kwargs(self, device) -> dict:
        """The arguments of transformers' forward."""
        inputs = self.processed if self.processed is not None else {"input_ids": self.tokens}
        return {key: value.to(device) for key, value in inputs.items()}


def parity(args: argparse.Namespace) -> int:
    hf_dir, ckpt = Path(args.hf), Path(args.mcore)
    hf_config = read_hf_config(hf_dir)
    family = model_family(hf_config, str(hf_dir / "config.json"))
    HFCheckpoint(hf_dir).check()  # a corrupt file: one line naming it, not transformers' traceback
    differ = mcore_checkpoint.config_differences(mcore_checkpoint.read_hf_config(ckpt), hf_config)
    if differ:
        print(f"warning: {ckpt}/{mcore_checkpoint.HF_CONFIG_FILE} differs from {hf_dir}/config.json in "
              + ", ".join(differ), flush=True)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    spec = family.from_hf_config(hf_config, parallel)
    if getattr(spec, "vision", None) is not None:
        inputs = _image_inputs(hf_dir, args.image, args.seed)
    else:
        if args.image is not None:
            raise SystemExit(f"--image: {hf_dir} holds a text-only model")
        if args.seq_len % args.tp:
            raise SystemExit(f"--seq-len {args.seq_len} must be divisible by --tp {args.tp} (sequence parallelism)")
        inputs = ParityInputs(_tokens(spec.vocab_size, args.seq_len, args.seed))
    use_te = transformer_engine_of(args)
    print(f"spec: {_spec_name(use_te)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "parity.json"
        spawn(_parity_rank, world_size_for(parallel), hf_dir, ckpt, hf_config, parallel, inputs, DTYPES[args.dtype],
              use_te, result_file)
        report = json.loads(result_file.read_text())
    print(json.dumps(report))
    return 0


def _spec_name(use_te: bool) -> str:
    """The ``transformer_impl`` value naming the spec built."""
    return "transformer_engine" if use_te else "local"


def _tokens(vocab: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))


def _image_inputs(hf_dir: Path, image_file: str | None, seed: int) -> ParityInputs:
    """The image (``image_file``, else a seeded synthetic one) and ``IMAGE_PROMPT`` through the
    processor saved with the model."""
    torchvision_compat.ensure_importable()
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_sapo.models.tiny_vl import synthetic_image

    if image_file is not None:
        try:
            image = Image.open(image_file).convert("RGB")
        except (OSError, ValueError) as err:
            raise InputError(f"--image {image_file}: not a readable image ({err})") from None
    else:
        image = synthetic_image(seed)
    try:
        processor = AutoProcessor.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise InputError(f"{hf_dir}: no processor to prepare the image with ({err})") from None
    batch = processor(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")
    return ParityInputs(batch["input_ids"], VisionInputs(batch["pixel_values"], batch["image_grid_thw"]), dict(batch))


def _build_rank_model(hf_config: dict, parallel: ParallelConfig, dtype: torch.dtype, use_te: bool):
    """This rank's share of the model, with the TransformerEngine layer spec when ``use_te``."""
    pg = initialize_model_parallel(parallel)
    family = model_family(hf_config)
    spec = family.from_hf_config(hf_config, parallel, params_dtype=dtype, use_te=use_te)
    model = family.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp), use_te=use_te)
    return family, model, spec, pg


def _forward(family, model, spec, inputs: ParityInputs, pg) -> torch.Tensor | None:
    """This rank's logits (last stage only), images and multimodal positions included."""
    device = next(model.parameters()).device
    tokens = inputs.tokens.to(device)
    if inputs.vision is None:
        return forward_logits(model, tokens, pg)
    positions = family.mrope_position_ids(tokens, inputs.vision.image_grid_thw, image_token_id=spec.image_token_id,
                                          spatial_merge_size=spec.vision.spatial_merge_size)
    vision = VisionInputs(inputs.vision.pixel_values.to(device), inputs.vision.image_grid_thw.to(device))
    return forward_logits(model, tokens, pg, position_ids=positions, vision=[vision])


def _parity_rank(hf_dir, ckpt, hf_config, parallel, inputs: ParityInputs, dtype, use_te: bool, result_file):
    family, model, spec, pg = _build_rank_model(hf_config, parallel, dtype, use_te)
    mcore_checkpoint.load_model(model, ckpt)
    hidden = _record_layer_outputs(model, pg)
    logits = _forward(family, model, spec, inputs, pg)
    if logits is not None:
        logits = all_gather_cat(logits, pg.tp, dim=-1)[..., : spec.vocab_size].float().cpu()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (hidden, logits))
    if dist.get_rank() == 0:
        megatron_hidden = {k: v for part, _ in gathered for k, v in part.items()}
        megatron_logits = next(lg for _, lg in gathered if lg is not None)
        device = next(model.parameters()).device
        report = _compare(hf_dir, inputs, megatron_logits, megatron_hidden, dtype, device)
        report.update(tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, tokens=inputs.tokens.shape[1],
                      dtype=str(dtype).split(".")[-1], device=device.type,
                      transformer_impl=_spec_name(use_te))
        if inputs.vision is not None:
            report.update(images=inputs.vision.num_images, image_grid_thw=inputs.vision.image_grid_thw.tolist())
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

    # Ahead of the model's own hooks: a vision-language model adds deepstack features to the
    # first layers' outputs in a hook, after the point where transformers records them.
    for index, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(keep(offset + index), prepend=True)
    if model.decoder.final_layernorm is not None:
        model.decoder.final_layernorm.register_forward_hook(keep("final_norm"))
    return store


def _compare(hf_dir, inputs: ParityInputs, megatron_logits, megatron_hidden, dtype, device) -> dict:
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if inputs.vision is None else AutoModelForImageTextToText
    reference = auto.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        out = reference(**inputs.reference_kwargs(device), output_hidden_states=True)
    layers = sorted(k for k in megatron_hidden if isinstance(k, int))
    seq = inputs.tokens.shape[1]  # the Megatron sequence may be padded for sequence parallelism

    def diff(ours, theirs):
        return (ours[:, :seq] - theirs.float().cpu()).abs().max().item()

    diffs = [diff(megatron_hidden[index], out.hidden_states[index + 1]) for index in layers[:-1]]
    diffs.append(diff(megatron_hidden["final_norm"], out.hidden_states[-1]))
    return {
        "max_abs_logit_diff": (megatron_logits - out.logits.float().cpu()).abs().max().item(),
        "hidden_state_max_abs_diff": diffs,
    }


def register(sub) -> None:
    p = sub.add_parser("parity", help="compare the Megatron model's logits with transformers (prints JSON)")
    p.add_argument("--hf", required=True, help="Hugging Face model folder")
    p.add_argument("--mcore", required=True, help="Megatron checkpoint folder of the same model")
    add_layout_args(p)
    add_transformer_impl_arg(p)
    p.add_argument("--seq-len", type=int, default=32, help="tokens in the test sequence of a text model (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test tokens or image (default 0)")
    p.add_argument("--image", help="vision-language models: an image file to use instead of the synthetic one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both models (default float32)")
    p.set_defaults(func=parity)


__all__ = ["parity", "register"]
