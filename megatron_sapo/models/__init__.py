"""Model families: which module handles a Hugging Face ``config.json``.

Every consumer of a model (converters, parity check, training set-up, weight sync) asks
:func:`model_family` for the module of a config and then calls the same functions on it:
``check_architecture``, ``from_hf_config``, ``build_model``, and takes the weight table through
:func:`weight_table`, which adds how the family's Hub checkpoints store experts. Families are
chosen by ``model_type`` (then by ``architectures``), never by a substring of a model's name.
A family's module is imported only when a config asks for it, so importing the converters
does not import the vision model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from megatron_sapo.config import ConfigError


@dataclass(frozen=True)
class Family:
    module: str
    """Import path of the family's module."""
    model_type: str
    architectures: tuple[str, ...]


FAMILIES = (
    Family("megatron_sapo.models.qwen3_moe", "qwen3_moe", ("Qwen3MoeForCausalLM",)),
    Family("megatron_sapo.models.qwen3_vl", "qwen3_vl_moe", ("Qwen3VLMoeForConditionalGeneration",)),
)


def read_hf_config(model_dir: str | Path) -> dict:
    """``config.json`` of a Hugging Face model folder (the same reader for every family)."""
    from megatron_sapo.models.qwen3_moe import read_hf_config as read

    return read(model_dir)


def model_family(hf_config: dict, source: str = "config.json") -> ModuleType:
    """The module handling ``hf_config`` (read from ``source``, named in errors)."""
    model_type = hf_config.get("model_type")
    found = hf_config.get("architectures") or []
    chosen = next((f for f in FAMILIES if f.model_type == model_type), None)
    if chosen is None:
        chosen = next((f for f in FAMILIES if set(found) & set(f.architectures)), None)
    if chosen is None:
        supported = ", ".join(f"{arch} (model_type {f.model_type!r})" for f in FAMILIES for arch in f.architectures)
        raise ConfigError(f"{source}: unsupported architecture {found or model_type!r} "
                          f"(model_type {model_type!r}); supported: {supported}")
    module = importlib.import_module(chosen.module)
    module.check_architecture(hf_config, source)
    return module


def weight_table(family: ModuleType, spec):
    """``family``'s weight table of ``spec``, carrying how the Hub stores its experts
    (``spec.fused_experts``: fused per layer), which every reader and writer of HF files follows."""
    from megatron_sapo.convert.hf_layout import FusedExperts

    return family.weight_table(spec).stored_as(FusedExperts.of(spec))


__all__ = ["FAMILIES", "Family", "model_family", "read_hf_config", "weight_table"]
