"""Reference computations for the SGLang tests: transformers log-probs, router top-k, greedy."""

from __future__ import annotations

from functools import lru_cache

import torch

from megatron_sapo import torchvision_compat


@lru_cache(maxsize=4)
def hf_model(path: str):
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs_and_routes(path: str, prompt: list[int], response: list[int]):
    """Per-response-token log-probs ``[R]`` and the router's top-k per input token and layer
    ``[P + R - 1, num_layers, k]`` (all layers; dense layers hold -1)."""
    model = hf_model(str(path))
    tokens = torch.tensor([prompt + response])
    out = model(tokens, output_router_logits=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    token_logprobs = torch.stack([logp[len(prompt) + i - 1, t] for i, t in enumerate(response)])
    k = model.config.num_experts_per_tok
    router_logits = iter(out.router_logits)
    routes = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            routes.append(torch.topk(next(router_logits).float(), k, -1).indices)
        else:
            routes.append(torch.full((tokens.shape[1], k), -1))
    return token_logprobs, torch.stack(routes, 1)[:-1]


@torch.no_grad()
def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    model = hf_model(str(path))
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]
