"""Routed experts returned by SGLang, decoded for Megatron's routing replay (R3).

SGLang (``--enable-return-routed-experts`` and ``return_routed_experts`` per request) returns
base64 of int32 ``[prompt + completion - 1, num_hidden_layers, top_k]``: the experts chosen
while reading every input token, for every decoder layer. Dense layers (``mlp_only_layers``,
``decoder_sparse_step``) have rows too, with no meaning; they are dropped here so the result
lists MoE layers only, in order, as :class:`megatron_sapo.types.Sample` documents.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np


def decode_routed_experts(payload: str, *, num_tokens: int, moe_layers: tuple[bool, ...],
                          top_k: int) -> np.ndarray:
    """int32 ``[num_tokens, sum(moe_layers), top_k]`` from SGLang's base64 payload.

    ``moe_layers`` has one flag per decoder layer (True for MoE layers; see
    :func:`megatron_sapo.models.qwen3_moe.moe_layer_pattern`).
    """
    try:
        flat = np.frombuffer(base64.b64decode(payload, validate=True), dtype=np.int32)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"routed_experts is not base64 of int32 values: {err}") from None
    per_token = len(moe_layers) * top_k
    if flat.size != num_tokens * per_token:
        raise ValueError(
            f"routed_experts holds {flat.size} values; expected {num_tokens} tokens x {len(moe_layers)} layers x "
            f"top-{top_k} = {num_tokens * per_token} (was the server started with --return-routed-experts, and "
            f"does it serve the same model?)")
    routes = flat.reshape(num_tokens, len(moe_layers), top_k)
    return np.ascontiguousarray(routes[:, np.asarray(moe_layers, dtype=bool), :])
