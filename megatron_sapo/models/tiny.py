"""Tiny random Qwen3-MoE checkpoints built from a config, for tests and CPU demos (no download).

Sizes are deliberately awkward so that layout bugs cannot pass silently: head_dim differs
from hidden/heads, hidden differs from 2 x expert width and from the expert width, one layer
is dense among MoE layers, and the vocabulary is odd (not a multiple of any TP size).
The expert width is 40, not smaller: grouped-GEMM kernels (torch's CPU one included) need bf16
rows of a multiple of 16 bytes, so the model also runs in bf16 in transformers and SGLang.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sapo import torchvision_compat

TINY_QWEN3_MOE = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=301,
    hidden_size=48,
    intermediate_size=88,
    moe_intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=20,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    attention_bias=False,
    router_aux_loss_coef=0.0,
)
DEMO_OVERRIDES = dict(mlp_only_layers=[])
"""The CPU demo's model is the tiny one without its dense layer (SGLang serves Qwen3-MoE layers
as MoE only)."""
DEMO_QWEN3_MOE = {**TINY_QWEN3_MOE, **DEMO_OVERRIDES}


def demo_config(**overrides) -> dict:
    """The demo model's config.json with ``overrides`` (``model.builtin_config``) applied."""
    from megatron_sapo.config import ConfigError

    fields = {**DEMO_QWEN3_MOE, **overrides}
    if fields["num_experts_per_tok"] > fields["num_experts"]:
        raise ConfigError(f"model.builtin_config: {fields['num_experts_per_tok']} experts per token (top-k) exceed "
                          f"the {fields['num_experts']} experts of the built-in model")
    return fields


def save_tiny_qwen3_moe(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Build a random Qwen3-MoE with transformers and ``save_pretrained`` it to ``out_dir``."""
    torchvision_compat.ensure_importable()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = {**TINY_QWEN3_MOE, **overrides}
    fields.pop("architectures"), fields.pop("model_type")
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields)).to(dtype)
    # transformers initialises norms to ones; random norms make the conversion tests meaningful.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def save_demo_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """The CPU demo's model: the tiny Qwen3-MoE with no dense layer (SGLang serves Qwen3-MoE
    layers as MoE only), fp32, saved with the tiny character tokenizer and its special tokens.
    ``overrides`` replace fields of its config.json (``model.builtin_config``)."""
    from megatron_sapo.data.tiny_tokenizer import EOS_ID, PAD_ID, save_tiny_tokenizer

    out = save_tiny_qwen3_moe(out_dir, seed=seed, dtype=torch.float32, **demo_config(**overrides),
                              eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    save_tiny_tokenizer(out)
    return out
