"""Qwen3-MoE (e.g. Qwen3-30B-A3B) on Megatron-Core: config derivation, model build, weight table.

``from_hf_config`` is the one place the Megatron ``TransformerConfig`` is derived from a Hugging
Face ``config.json``; nothing else retypes architecture numbers. ``WEIGHT_TABLE`` maps every
Megatron parameter to its HF tensors, for the local layer spec (CPU) and the TransformerEngine
spec (GPU, grouped GEMM) alike.

Layer kinds follow HF's rule: layer ``i`` is MoE unless it is in ``mlp_only_layers``, and only
if ``(i + 1) % decoder_sparse_step == 0``; the others are dense SwiGLU MLPs of width
``intermediate_size``. Routing: softmax over all experts, top-k, renormalised when
``norm_topk_prob`` (Megatron: top-k on logits then softmax over them, which is the same).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_sapo.config import ConfigError, ParallelConfig, RouterConfig
from megatron_sapo.convert.mapping import MappingTable, WeightMap
from megatron_sapo.convert.sharding import Split, SplitGLU
from megatron_sapo.convert.transforms import FuseGLU, FuseQKV, PadVocab

if TYPE_CHECKING:  # annotations only: Megatron is imported when a model is built
    from megatron.core.transformer import TransformerConfig

ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class Qwen3MoeSpec:
    """What building the Megatron model needs: its TransformerConfig plus the GPTModel arguments."""

    config: TransformerConfig
    vocab_size: int
    """True vocabulary size (config.json)."""
    padded_vocab_size: int
    """Rows of the embedding/output matrices: a multiple of vocab_divisor * tp."""
    max_position_embeddings: int
    rotary_base: float
    tie_word_embeddings: bool
    moe_layers: tuple[bool, ...]
    fused_experts: bool = False
    """Whether the HF checkpoint stores each layer's experts as fused tensors (Qwen3-VL-MoE);
    the table always names experts one by one (see ``convert/hf_layout.py``)."""


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: expected a Hugging Face model folder") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def check_architecture(hf: dict, source: str = "config.json") -> None:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "qwen3_moe" and not set(archs) & set(ARCHITECTURES):
        raise ConfigError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; this module handles "
            f"{', '.join(ARCHITECTURES)} (model_type 'qwen3_moe')")


def moe_layer_pattern(hf: dict) -> tuple[bool, ...]:
    experts = _num_experts(hf)
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return tuple(
        experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"])
    )


def padded_vocab(vocab_size: int, tp: int, divisor: int) -> int:
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def from_hf_config(
    hf: dict,
    parallel: ParallelConfig,
    *,
    router: RouterConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    vocab_divisor: int = 128,
    use_te: bool = False,
) -> Qwen3MoeSpec:
    """Derive the Megatron-Core config of a Qwen3-MoE ``config.json`` for a parallel layout."""
    check_architecture(hf)
    return text_model_spec(hf, parallel, router=router, params_dtype=params_dtype, vocab_divisor=vocab_divisor,
                           use_te=use_te)


def text_model_spec(
    hf: dict,
    parallel: ParallelConfig,
    *,
    router: RouterConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    vocab_divisor: int = 128,
    use_te: bool = False,
    extra_fields: dict | None = None,
) -> Qwen3MoeSpec:
    """The spec of a Qwen3-MoE text model from its (text) config fields, whatever model holds it;
    ``extra_fields`` are further ``TransformerConfig`` fields (e.g. multimodal RoPE sections)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    router = router or RouterConfig()
    hidden, heads = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    moe_layers = moe_layer_pattern(hf)
    experts = _num_experts(hf)
    rope_theta, rope_type = _rope(hf)
    if rope_type not in (None, "default"):
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE)")
    if kv_heads % parallel.tp:
        raise ConfigError(f"num_key_value_heads={kv_heads} is not divisible by parallel.tp={parallel.tp}")
    if any(moe_layers) and experts % parallel.ep:
        raise ConfigError(f"num_experts={experts} is not divisible by parallel.ep={parallel.ep}")
    if hf["num_hidden_layers"] % parallel.pp:
        raise ConfigError(f"num_hidden_layers={hf['num_hidden_layers']} is not divisible by parallel.pp={parallel.pp}")
    recompute = recompute_fields(parallel, hf["num_hidden_layers"] // parallel.pp)
    if router.expert_bias:
        raise ConfigError("router.expert_bias needs a sigmoid-scored router; Qwen3-MoE routes with softmax")

    fields = dict(
        num_layers=_require(hf, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        ffn_hidden_size=hf.get("intermediate_size") or _require(hf, "moe_intermediate_size"),
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(hf.get("attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=parallel.sequence_parallel,
        # Microbatches have their own lengths (training/microbatch.py); pipeline stages then
        # exchange each activation's shape first.
        variable_seq_lengths=parallel.pp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fused kernels exist only with CUDA (and TE/Apex); the unfused paths are exact.
        bias_dropout_fusion=use_te,
        apply_rope_fusion=False,
        masked_softmax_fusion=use_te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute,
    )
    if any(moe_layers):
        fields.update(
            num_moe_experts=experts,
            moe_layer_freq=[int(m) for m in moe_layers],
            moe_ffn_hidden_size=_require(hf, "moe_intermediate_size"),
            moe_router_topk=_require(hf, "num_experts_per_tok"),
            moe_router_pre_softmax=not hf.get("norm_topk_prob", True),
            moe_router_score_function="softmax",
            moe_router_dtype=router.dtype,
            moe_router_fusion=False,
            moe_enable_routing_replay=router.routing_replay,
            moe_router_load_balancing_type="aux_loss" if router.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=router.aux_loss_coeff,
            moe_router_enable_expert_bias=router.expert_bias,
            moe_router_bias_update_rate=router.bias_update_rate if router.expert_bias else 0.0,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=use_te,
            moe_permute_fusion=False,
        )
    fields.update(extra_fields or {})
    vocab = _require(hf, "vocab_size")
    return Qwen3MoeSpec(
        config=TransformerConfig(**fields),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, parallel.tp, vocab_divisor),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        rotary_base=rope_theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe_layers=moe_layers,
    )


def recompute_fields(parallel: ParallelConfig, layers_per_stage: int) -> dict:
    """The ``TransformerConfig`` fields of ``parallel.recompute`` for stages of
    ``layers_per_stage`` layers (Megatron wants no method or layer count for "selective")."""
    if parallel.recompute == "none":
        return {}
    if parallel.recompute == "selective":
        return dict(recompute_granularity="selective")
    count = parallel.recompute_num_layers
    if parallel.recompute_method == "uniform" and layers_per_stage % count:
        raise ConfigError(f"parallel.recompute_num_layers={count} does not divide the {layers_per_stage} layers of "
                          f"a pipeline stage (recompute_method \"uniform\" recomputes chunks of that many layers)")
    if count > layers_per_stage:
        raise ConfigError(f"parallel.recompute_num_layers={count} exceeds the {layers_per_stage} layers of a "
                          "pipeline stage")
    return dict(recompute_granularity="full", recompute_method=parallel.recompute_method, recompute_num_layers=count)


def build_model(spec: Qwen3MoeSpec, pg_collection, *, use_te: bool = False, pp_rank: int = 0,
                position_embedding_type: str = "rope"):
    """A ``GPTModel`` holding this rank's share of the model (stage ``pp_rank`` under PP)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    pp_size = spec.config.pipeline_model_parallel_size
    layer_spec = get_gpt_decoder_block_spec(spec.config, use_transformer_engine=use_te, normalization="RMSNorm",
                                            pp_rank=pp_rank)
    model = GPTModel(
        config=spec.config,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_base=int(spec.rotary_base),
        pg_collection=pg_collection,
    )
    # Megatron creates some modules (the local spec's torch norms) on the CPU and leaves placement
    # to the caller; a model built on the meta device stays there.
    if torch.cuda.is_available() and any(p.device.type == "cpu" for p in model.parameters()):
        model.cuda(torch.cuda.current_device())
    return model


def weight_table(spec: Qwen3MoeSpec) -> MappingTable:
    """Every Megatron parameter of the model and the HF tensors it is made of."""
    return MappingTable(text_entries(spec))


def text_entries(spec: Qwen3MoeSpec, megatron_prefix: str = "", hf_prefix: str = "model.") -> list[WeightMap]:
    """The table's rows for a Qwen3-MoE text model whose Megatron names start with
    ``megatron_prefix`` and whose HF names (but ``lm_head``) start with ``hf_prefix``."""
    cfg = spec.config
    vocab = PadVocab(spec.vocab_size, spec.padded_vocab_size)
    qkv = FuseQKV(cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels)
    layer, hf_layer = f"{megatron_prefix}decoder.layers.{{layer}}", f"{hf_prefix}layers.{{layer}}"
    attn, hf_attn = f"{layer}.self_attention", f"{hf_layer}.self_attn"
    hf_expert = f"{hf_layer}.mlp.experts.{{expert}}"
    entries = [
        WeightMap(f"{megatron_prefix}embedding.word_embeddings.weight", (f"{hf_prefix}embed_tokens.weight",), vocab,
                  Split(0)),
        WeightMap(f"{megatron_prefix}decoder.final_layernorm.weight", (f"{hf_prefix}norm.weight",)),
        WeightMap(f"{attn}.linear_qkv.weight",
                  (f"{hf_attn}.q_proj.weight", f"{hf_attn}.k_proj.weight", f"{hf_attn}.v_proj.weight"), qkv, Split(0)),
        WeightMap(f"{attn}.linear_proj.weight", (f"{hf_attn}.o_proj.weight",), split=Split(1)),
        WeightMap(f"{attn}.q_layernorm.weight", (f"{hf_attn}.q_norm.weight",)),
        WeightMap(f"{attn}.k_layernorm.weight", (f"{hf_attn}.k_norm.weight",)),
        # The local spec keeps norms as modules; the TE spec fuses them into the next linear.
        WeightMap(f"{layer}.input_layernorm.weight", (f"{hf_layer}.input_layernorm.weight",)),
        WeightMap(f"{attn}.linear_qkv.layer_norm_weight", (f"{hf_layer}.input_layernorm.weight",)),
        WeightMap(f"{layer}.pre_mlp_layernorm.weight", (f"{hf_layer}.post_attention_layernorm.weight",)),
        WeightMap(f"{layer}.mlp.linear_fc1.layer_norm_weight", (f"{hf_layer}.post_attention_layernorm.weight",)),
        # Dense layers.
        WeightMap(f"{layer}.mlp.linear_fc1.weight",
                  (f"{hf_layer}.mlp.gate_proj.weight", f"{hf_layer}.mlp.up_proj.weight"), FuseGLU(), SplitGLU(0)),
        WeightMap(f"{layer}.mlp.linear_fc2.weight", (f"{hf_layer}.mlp.down_proj.weight",), split=Split(1)),
        # MoE layers: the router is replicated; experts are split over EP, each over expert-TP.
        WeightMap(f"{layer}.mlp.router.weight", (f"{hf_layer}.mlp.gate.weight",)),
    ]
    for fc1, fc2 in ((f"{layer}.mlp.experts.local_experts.{{expert}}.linear_fc1.weight",
                      f"{layer}.mlp.experts.local_experts.{{expert}}.linear_fc2.weight"),
                     (f"{layer}.mlp.experts.linear_fc1.weight{{expert}}",
                      f"{layer}.mlp.experts.linear_fc2.weight{{expert}}")):
        entries += [
            WeightMap(fc1, (f"{hf_expert}.gate_proj.weight", f"{hf_expert}.up_proj.weight"), FuseGLU(), SplitGLU(0),
                      group="expert_tp"),
            WeightMap(fc2, (f"{hf_expert}.down_proj.weight",), split=Split(1), group="expert_tp"),
        ]
    if not spec.tie_word_embeddings:
        entries.append(WeightMap(f"{megatron_prefix}output_layer.weight", ("lm_head.weight",), vocab, Split(0)))
    return entries


def _num_experts(hf: dict) -> int:
    return int(hf.get("num_experts") or hf.get("num_local_experts") or 0)


def _rope(hf: dict) -> tuple[float, str | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), params.get("rope_type") or params.get("type")


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json has no {key!r}, which a Qwen3-MoE model needs")
    return hf[key]


__all__ = ["Qwen3MoeSpec", "build_model", "from_hf_config", "moe_layer_pattern", "read_hf_config",
           "recompute_fields", "text_entries", "text_model_spec", "weight_table"]
