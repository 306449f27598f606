"""HF config.json -> Megatron TransformerConfig for Qwen3-MoE."""

import json
from pathlib import Path

import pytest
import torch

from megatron_sapo.config import ConfigError, ParallelConfig, RouterConfig
from megatron_sapo.models import qwen3_moe
from megatron_sapo.models.tiny import TINY_QWEN3_MOE

pytestmark = pytest.mark.unit

QWEN3_30B_A3B = json.loads((Path(__file__).parents[2] / "examples" / "qwen3_30b_a3b" / "hf_config.json").read_text())
"""Qwen3-30B-A3B's config.json, as shipped beside its run configs."""


def test_qwen3_30b_a3b_fields():
    spec = qwen3_moe.from_hf_config(QWEN3_30B_A3B, ParallelConfig(tp=4, ep=8))
    c = spec.config
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == (48, 2048, 32, 4, 128)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (128, 8, 768)
    assert c.qk_layernorm and c.gated_linear_unit and c.normalization == "RMSNorm" and not c.add_bias_linear
    assert c.moe_router_pre_softmax is False and c.moe_router_dtype == "fp32" and c.moe_router_fusion is False
    assert c.moe_enable_routing_replay and c.moe_router_load_balancing_type == "none" and c.moe_aux_loss_coeff == 0
    assert c.sequence_parallel and c.expert_tensor_parallel_size == 1
    assert spec.rotary_base == 1e6 and spec.padded_vocab_size == 152064 and spec.vocab_size == 151936
    assert spec.moe_layers == (True,) * 48


def test_dense_layers_from_mlp_only_layers_and_sparse_step():
    hf = {**TINY_QWEN3_MOE, "num_hidden_layers": 6, "mlp_only_layers": [4], "decoder_sparse_step": 2}
    assert qwen3_moe.moe_layer_pattern(hf) == (False, True, False, True, False, True)
    hf["mlp_only_layers"] = [3]
    spec = qwen3_moe.from_hf_config(hf, ParallelConfig())
    assert spec.config.moe_layer_freq == [0, 1, 0, 0, 0, 1]
    assert spec.config.ffn_hidden_size == hf["intermediate_size"]


def test_accepts_num_local_experts_head_dim_and_rope_parameters():
    hf = {k: v for k, v in TINY_QWEN3_MOE.items() if k not in ("num_experts", "rope_theta")}
    hf.update(num_local_experts=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    spec = qwen3_moe.from_hf_config(hf, ParallelConfig())
    assert spec.config.num_moe_experts == 4 and spec.rotary_base == 5e5
    assert spec.config.kv_channels == 20 != hf["hidden_size"] // hf["num_attention_heads"]


def test_norm_topk_prob_false_routes_with_pre_softmax():
    spec = qwen3_moe.from_hf_config({**TINY_QWEN3_MOE, "norm_topk_prob": False}, ParallelConfig())
    assert spec.config.moe_router_pre_softmax is True


def test_vocab_padding_follows_tp_and_remembers_true_size():
    assert qwen3_moe.padded_vocab(301, 1, 128) == 384
    assert qwen3_moe.padded_vocab(301, 2, 128) == 512
    spec = qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig(tp=2), vocab_divisor=8)
    assert (spec.vocab_size, spec.padded_vocab_size) == (301, 304)


def test_router_settings_are_configurable():
    spec = qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig(),
                                    router=RouterConfig(aux_loss_coeff=1e-3, routing_replay=False))
    c = spec.config
    assert c.moe_router_load_balancing_type == "aux_loss" and c.moe_aux_loss_coeff == 1e-3
    assert not c.moe_router_enable_expert_bias and not c.moe_enable_routing_replay
    with pytest.raises(ConfigError, match="router.expert_bias needs a sigmoid-scored router"):
        qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig(), router=RouterConfig(expert_bias=True))


def test_params_dtype():
    spec = qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig(), params_dtype=torch.bfloat16)
    assert spec.config.params_dtype == torch.bfloat16 and spec.config.bf16


@pytest.mark.parametrize(
    "changes, parallel, message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, {}, "unsupported architecture"),
        ({"hidden_size": None}, {}, "'hidden_size'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, {}, "rope type 'yarn'"),
        ({}, {"tp": 4}, "num_key_value_heads=2 is not divisible by parallel.tp=4"),
        ({}, {"ep": 3}, "num_experts=4 is not divisible by parallel.ep=3"),
    ],
)
def test_bad_configs_are_explained(changes, parallel, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        qwen3_moe.from_hf_config({**TINY_QWEN3_MOE, **changes}, ParallelConfig(**parallel))


def test_weight_table_covers_both_layer_specs():
    table = qwen3_moe.weight_table(qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig()))
    local = table.match("decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight")
    grouped = table.match("decoder.layers.3.mlp.experts.linear_fc1.weight2")
    for m in (local, grouped):
        assert (m.layer, m.expert) == (3, 2)
        assert m.entry.hf_names(3, 2) == ("model.layers.3.mlp.experts.2.gate_proj.weight",
                                          "model.layers.3.mlp.experts.2.up_proj.weight")
    fused_norm = table.match("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    assert fused_norm.entry.hf_names(0, None) == ("model.layers.0.input_layernorm.weight",)
    with pytest.raises(KeyError, match="no mapping"):
        table.match("decoder.layers.0.mystery.weight")


@pytest.mark.parametrize("parallel, fields", [
    (ParallelConfig(), dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)),
    (ParallelConfig(recompute="selective"),
     dict(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None)),
    (ParallelConfig(recompute="full"),
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    (ParallelConfig(recompute="full", recompute_method="block", recompute_num_layers=3, pp=2),
     dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3)),
], ids=["none", "selective", "full-uniform", "full-block"])
def test_recompute_reaches_the_transformer_config(parallel, fields):
    config = qwen3_moe.from_hf_config({**TINY_QWEN3_MOE, "num_hidden_layers": 6}, parallel).config
    assert {key: getattr(config, key) for key in fields} == fields
    assert config.recompute_modules == ["core_attn"]  # Megatron's selective default


@pytest.mark.parametrize("parallel, message", [
    (dict(recompute="full", recompute_num_layers=4), "recompute_num_layers=4 does not divide the 6 layers"),
    (dict(recompute="full", recompute_method="block", recompute_num_layers=4, pp=2),
     "recompute_num_layers=4 exceeds the 3 layers of a pipeline stage"),
])
def test_recompute_layer_counts_must_fit_a_stage(parallel, message):
    with pytest.raises(ConfigError, match=message):
        qwen3_moe.from_hf_config({**TINY_QWEN3_MOE, "num_hidden_layers": 6}, ParallelConfig(**parallel))


@pytest.mark.parametrize("changes, key", [
    (dict(recompute="partial"), "parallel.recompute must be one of none, selective, full"),
    (dict(recompute_method="even"), "parallel.recompute_method must be one of uniform, block"),
    (dict(recompute_num_layers=0), "parallel.recompute_num_layers must be an integer >= 1"),
    (dict(recompute_num_layers=True), "parallel.recompute_num_layers must be an integer >= 1"),
])
def test_recompute_settings_are_validated_by_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        ParallelConfig(**changes)
