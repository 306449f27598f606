"""Megatron-Core distributed checkpoints (torch_dist) of a model, with the HF config beside them.

A checkpoint folder holds Megatron's files plus ``hf_config.json`` (the source architecture,
so exports and loads need no other input). Megatron stores every weight as its global tensor
(experts and layers by global index), so a checkpoint written at one TP/PP/EP loads at any
other. Writing goes to a temporary sibling folder renamed at the end: a crash never leaves a
half checkpoint under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megatron_sapo.convert.hf_checkpoint import copy_tokenizer_files
from megatron_sapo.convert.output import check_target, partial_dir, partial_path, publish
from megatron_sapo.errors import InputError

HF_CONFIG_FILE = "hf_config.json"


def save_model(model, out_dir: str | Path, hf_config: dict, *, force: bool = False,
               extra_files_from: Path | None = None) -> Path:
    """Collective: every rank calls it with its share of the model. Tokenizer files found in
    ``extra_files_from`` are kept beside the weights, for the way back to HF."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    check_target(out, force)  # on every rank, so none waits at the barrier for a rank that raised
    tmp = partial_dir(out) if dist.get_rank() == 0 else partial_path(out)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if extra_files_from is not None:
            copy_tokenizer_files(Path(extra_files_from), tmp)
        publish(tmp, out)
    dist.barrier()
    return out


def read_hf_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / HF_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a checkpoint written by megatron-sapo")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None


# Fields of config.json that say how a checkpoint was saved or used, not what the model is.
NOT_ARCHITECTURE = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"})


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for each architecture field two HF configs both have and disagree
    on (a field only one has is a default that the other's writer left out)."""
    differ = []
    for key in sorted(set(saved) & set(current)):
        if key in NOT_ARCHITECTURE:
            continue
        a, b = saved[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            differ += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differ.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return differ


def load_model(model, ckpt_dir: str | Path) -> None:
    """Collective: load this rank's share of ``model`` from a checkpoint of any layout."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state, strict=True)
