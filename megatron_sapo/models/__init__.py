"""Model families: which module handles a Hugging Face ``config.json``.

Every consumer of a model (converters, parity check, training set-up, weight sync) asks
:func:`model_family` for the module of a config and then calls the same functions on it:
``check_architecture``, ``from_hf_config``, ``build_model``, and takes the weight table through
:func:`weight_table`, which adds how the family's Hub checkpoints store experts. Families are
chosen by ``model_type`` (then by ``architectures``), never by a substring of a model's name.
A family's module is imported only when a config asks for it, so importing the converters
does not import the vision model.

Which Megatron layer spec a model is built with (TransformerEngine or local) is decided once,
by :func:`use_transformer_engine`, for every builder alike: training, conversion and the parity
check must agree, because a checkpoint's keys follow the spec that wrote it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from megatron_sapo.config import TRANSFORMER_IMPLS, ConfigError


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


def use_transformer_engine(impl: str, key: str = "model.transformer_impl") -> bool:
    """Whether to build with Megatron's TransformerEngine layer spec for ``impl`` (the value of
    ``key``): "local" never; "transformer_engine" always, an error naming what is missing where
    it cannot; "auto" where it can (so CPU machines build the local spec)."""
    if impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"{key} must be one of {', '.join(TRANSFORMER_IMPLS)}; got {impl!r}")
    if impl == "local":
        return False
    missing = _transformer_engine_missing()
    if impl == "transformer_engine" and missing:
        raise ConfigError(f"{key} = \"transformer_engine\", but {' and '.join(missing)}")
    return not missing


def _transformer_engine_missing() -> list[str]:
    """What the TransformerEngine spec lacks on this machine. The package is imported only where
    CUDA is present: on a CPU machine knowing that it is installed is enough."""
    import importlib.util

    import torch

    missing = [] if torch.cuda.is_available() else ["no CUDA device is available"]
    if importlib.util.find_spec("transformer_engine") is None:
        missing.append("the transformer_engine package is not installed")
    elif not missing:
        try:
            importlib.import_module("transformer_engine.pytorch")
        except (ImportError, OSError) as err:  # a build that does not match this torch or CUDA
            missing.append(f"the transformer_engine package does not import ({err})")
    return missing


def weight_table(family: ModuleType, spec):
    """``family``'s weight table of ``spec``, carrying how the Hub stores its experts
    (``spec.fused_experts``: fused per layer), which every reader and writer of HF files follows."""
    from megatron_sapo.convert.hf_layout import FusedExperts

    return family.weight_table(spec).stored_as(FusedExperts.of(spec))


__all__ = ["FAMILIES", "Family", "model_family", "read_hf_config", "use_transformer_engine", "weight_table"]
