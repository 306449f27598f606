"""Choosing the model family of a config.json, and the storage its weight table carries."""

import importlib
import subprocess
import sys

import pytest

from megatron_sapo import models
from megatron_sapo.config import ConfigError, ParallelConfig
from megatron_sapo.convert.hf_layout import FusedExperts
from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.models.tiny_vl import TINY_QWEN3_VL_MOE

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("config, module", [(TINY_QWEN3_MOE, "qwen3_moe"), (TINY_QWEN3_VL_MOE, "qwen3_vl")])
def test_family_by_model_type_or_architecture(config, module):
    assert models.model_family(dict(config)).__name__ == f"megatron_sapo.models.{module}"
    no_type = {k: v for k, v in config.items() if k != "model_type"}
    assert models.model_family(no_type).__name__ == f"megatron_sapo.models.{module}"


def test_unsupported_config_names_file_architecture_and_supported_ones():
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    with pytest.raises(ConfigError) as err:
        models.model_family(config, "/m/config.json")
    message = str(err.value)
    assert message.startswith("/m/config.json: unsupported architecture ['LlamaForCausalLM']")
    assert "Qwen3MoeForCausalLM (model_type 'qwen3_moe')" in message
    assert "Qwen3VLMoeForConditionalGeneration (model_type 'qwen3_vl_moe')" in message


def test_family_checks_its_own_fields():
    with pytest.raises(ConfigError, match="/m/config.json: a Qwen3-VL-MoE config needs a 'vision_config'"):
        models.model_family({"model_type": "qwen3_vl_moe", "text_config": {}}, "/m/config.json")


def test_registry_lists_what_each_module_declares():
    for family in models.FAMILIES:
        module = importlib.import_module(family.module)
        assert tuple(module.ARCHITECTURES) == family.architectures


def test_weight_table_carries_fused_expert_storage():
    moe, vl = models.model_family(TINY_QWEN3_MOE), models.model_family(TINY_QWEN3_VL_MOE)
    assert models.weight_table(moe, moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig())).fused_experts is None
    table = models.weight_table(vl, vl.from_hf_config(TINY_QWEN3_VL_MOE, ParallelConfig()))
    text = TINY_QWEN3_VL_MOE["text_config"]
    assert table.fused_experts == FusedExperts(text["num_experts"], text["hidden_size"], text["moe_intermediate_size"])


def test_converters_do_not_import_the_vision_model():
    code = ("import sys; import megatron_sapo.convert.commands, megatron_sapo.convert.streaming, "
            "megatron_sapo.convert.parity; print('megatron_sapo.models.qwen3_vl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
