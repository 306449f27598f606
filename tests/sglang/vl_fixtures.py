"""Image prompts and transformers references shared by the Qwen3-VL-MoE SGLang tests.

Prompts are made with the chat template and the processor of the served folder, as the data
pipeline makes them (image pads expanded in ``prompt_ids``); transformers on a model folder is
the reference for log-probs, greedy tokens and the router's top-k.
"""

from __future__ import annotations

import io
from functools import lru_cache

import torch

from megatron_sapo import torchvision_compat
from megatron_sapo.models.tiny_vl import png_bytes, synthetic_image
from megatron_sapo.types import Prompt


@lru_cache(maxsize=2)
def processor(path: str):
    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@lru_cache(maxsize=2)
def hf_model(path: str):
    torchvision_compat.ensure_importable()
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def image_prompt(path, index: int, image_sizes: tuple[int, ...], question: str) -> Prompt:
    """A chat prompt with one image part per size (random pixels), encoded by the processor."""
    images = [synthetic_image(seed=100 * index + i, size=size) for i, size in enumerate(image_sizes)]
    proc = processor(str(path))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    encoded = proc(text=[text], images=images, return_tensors="pt")
    return Prompt(index=index, prompt_ids=encoded["input_ids"][0].tolist(), text=text,
                  images=[png_bytes(image) for image in images])


@torch.no_grad()
def hf_reference(path, prompt: Prompt, response: list[int]):
    """transformers on prompt + response: the response tokens' log-probs ``[R]``, the greedy
    token after each prefix ``[R]``, and the router's top-k per input token ``[P + R - 1, layers, k]``."""
    from PIL import Image

    model = hf_model(str(path))
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in prompt.images]
    vision = processor(str(path)).image_processor(images, return_tensors="pt")
    tokens = torch.tensor([prompt.prompt_ids + response])
    image_tokens = (tokens == model.config.image_token_id).long()
    out = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), pixel_values=vision["pixel_values"],
                image_grid_thw=vision["image_grid_thw"], mm_token_type_ids=image_tokens, output_router_logits=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    positions = torch.arange(len(prompt.prompt_ids) - 1, tokens.shape[1] - 1)
    token_logprobs = logp[positions, torch.tensor(response)]
    greedy = logp[positions].argmax(-1).tolist()
    k = model.config.text_config.num_experts_per_tok
    routes = torch.stack([torch.topk(layer_logits.float(), k, -1).indices for layer_logits in out.router_logits], 1)
    return token_logprobs, greedy, routes[:-1].numpy()
