"""A tiny random Qwen3-VL-MoE checkpoint with its tokenizer and processor, for tests (no download).

The folder it writes loads offline in transformers (``AutoProcessor``,
``Qwen3VLMoeForConditionalGeneration``) and in SGLang. Choices, each for a reason:

- Awkward sizes, as in :mod:`megatron_sapo.models.tiny`: text hidden 48 with 4 heads of 20
  (so the head width is not hidden / heads), expert width 40 (hidden != 2 x width != width),
  an odd vocabulary (307), untied embeddings. A transposition or split bug then fails loudly.
- Six MoE text layers and three deepstack layers: SGLang 0.5.23 hard-codes three deepstack
  inputs (so at least three text layers), and six keeps them on the first stage at PP=2.
- Fused experts are written in the Hub orientation (``gate_up_proj [E, H, 2I]``, gate first
  along the last axis, and ``down_proj [E, I, H]``), which is what published checkpoints and
  SGLang's loader use. transformers 5.19 keeps its in-memory orientation (``[E, 2I, H]`` /
  ``[E, H, I]``) when it saves, so the saved tensors are rewritten.
- Norm weights are drawn from U(0.5, 1.5) and every bias from U(-0.5, 0.5) (transformers
  initialises them to ones and zeros), so a converter that drops or swaps one is caught.
- The tokenizer is the tiny character tokenizer with the vision tokens; the image processor has
  4-pixel patches so a 32 x 32 image is 8 x 8 patches, i.e. 16 image tokens after the 2 x 2 merge.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch

from megatron_sapo import torchvision_compat
from megatron_sapo.convert.hf_layout import write_hub_expert_orientation
from megatron_sapo.data.tiny_tokenizer import (EOS_ID, IMAGE_PAD_ID, PAD_ID, VIDEO_PAD_ID, VISION_END_ID,
                                               VISION_START_ID, build_tiny_tokenizer)

TINY_QWEN3_VL_MOE = dict(
    architectures=["Qwen3VLMoeForConditionalGeneration"],
    model_type="qwen3_vl_moe",
    text_config=dict(
        vocab_size=307,
        hidden_size=48,
        intermediate_size=88,
        moe_intermediate_size=40,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=20,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[4, 3, 3],
                             mrope_interleaved=True),
        max_position_embeddings=1024,
        attention_bias=False,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
    vision_config=dict(
        depth=4,
        hidden_size=32,
        num_heads=2,
        intermediate_size=56,
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=48,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 2, 3],
    ),
    image_token_id=IMAGE_PAD_ID,
    video_token_id=VIDEO_PAD_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
    tie_word_embeddings=False,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

# The image processor's pixel budget: up to 64 x 64 pixels (64 image tokens) per image.
MIN_PIXELS, MAX_PIXELS = 8 * 8, 64 * 64


def build_tiny_qwen3_vl_moe(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """The random ``Qwen3VLMoeForConditionalGeneration`` that :func:`save_tiny_qwen3_vl_moe` saves
    (same seed, same weights), in memory.

    ``overrides`` replace top-level fields; ``text_config`` / ``vision_config`` overrides are
    dicts merged into the defaults (``text_config={"num_hidden_layers": 3}``).
    """
    torchvision_compat.ensure_importable()
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    fields = _merged_fields(overrides)
    fields.pop("architectures"), fields.pop("model_type")
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**fields)).to(dtype)
    _randomise_norms_and_biases(model)
    return model.eval()


def save_tiny_qwen3_vl_moe(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                           **overrides) -> Path:
    """Build a random Qwen3-VL-MoE with transformers and save it to ``out_dir`` with the tiny
    tokenizer and a matching processor (overrides as for :func:`build_tiny_qwen3_vl_moe`)."""
    model = build_tiny_qwen3_vl_moe(seed, dtype, **overrides)
    out = Path(out_dir)
    model.save_pretrained(out)
    write_hub_expert_orientation(model, out)
    save_tiny_vl_processor(out, model.config.vision_config.to_dict())
    return out


def save_tiny_vl_processor(out_dir: str | Path, vision_config: dict | None = None) -> Path:
    """Save the tiny tokenizer and a Qwen3-VL processor whose patching matches ``vision_config``."""
    torchvision_compat.ensure_importable()
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vision = vision_config or TINY_QWEN3_VL_MOE["vision_config"]
    patching = dict(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                    merge_size=vision["spatial_merge_size"])
    tokenizer = build_tiny_tokenizer()
    images = Qwen2VLImageProcessor(**patching, size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    videos = Qwen3VLVideoProcessor(**patching)
    processor = Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                 chat_template=tokenizer.chat_template)
    out = Path(out_dir)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def synthetic_image(seed: int, size: int = 32):
    """A ``size`` x ``size`` RGB image of uniform random pixels (a PIL image).

    Sizes that are multiples of 8 (patch 4 x merge 2) need no resizing in the processor, so the
    server and transformers see identical pixels.
    """
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def png_bytes(image) -> bytes:
    """``image`` (PIL) encoded as PNG, lossless, as :class:`megatron_sapo.types.Prompt` carries images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _merged_fields(overrides: dict) -> dict:
    fields = copy.deepcopy(TINY_QWEN3_VL_MOE)
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            fields[key].update(value)
        else:
            fields[key] = value
    return fields


def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
