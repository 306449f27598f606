"""Image prompts through the RL client against a real SGLang server on CPU (tiny Qwen3-VL-MoE, fp32).

One server for the module, on the tiny Qwen3-VL-MoE with its tokenizer and processor; prompts
are made with the chat template and the processor, as the data pipeline makes them (the image
pads expanded in ``prompt_ids``). transformers, on the same folder, is the reference for
log-probs, greedy tokens and the router's top-k.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from megatron_sapo.data.tiny_tokenizer import IMAGE_PAD_ID
from megatron_sapo.models.qwen3_moe import moe_layer_pattern, read_hf_config
from megatron_sapo.models.tiny_vl import png_bytes, save_tiny_qwen3_vl_moe, synthetic_image
from megatron_sapo.rollout.client import (RolloutClient, RolloutError, RoutedExperts, SamplingParams,
                                          collapse_image_runs, image_data_uri)
from megatron_sapo.rollout.manager import ServerManager
from megatron_sapo.rollout.server import ServerOptions
from megatron_sapo.parallel.ports import free_port
from megatron_sapo.types import Prompt
from vl_fixtures import hf_reference, image_prompt

pytestmark = pytest.mark.sglang

TEXT_LAYERS, TOP_K = 6, 2
LOGPROB_TOL = 1e-3
"""fp32 on both sides; measured below 1e-6 (the bf16 prototype was within 4e-3)."""


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    return save_tiny_qwen3_vl_moe(tmp_path_factory.mktemp("sglang_vl") / "model", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def vl_manager(vl_model, tmp_path_factory):
    options = ServerOptions(model=str(vl_model), port=free_port(), return_routed_experts=True, dtype="float32")
    with ServerManager([options], tmp_path_factory.mktemp("sglang_vl_logs"), startup_timeout_s=600) as manager:
        yield manager


@pytest.fixture(scope="module")
def client(vl_manager, vl_model) -> RolloutClient:
    hf = read_hf_config(vl_model)
    text = hf["text_config"]
    return RolloutClient(vl_manager.urls, image_token_id=hf["image_token_id"],
                         routed_experts=RoutedExperts(moe_layer_pattern(text), text["num_experts_per_tok"]))


def route_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
    """Token-layers whose expert sets agree, and how many there are."""
    assert ours.shape == theirs.shape
    agree = (np.sort(ours, -1) == np.sort(theirs, -1)).all(-1)
    return int(agree.sum()), agree.size


# ---- request forms (no server) -------------------------------------------------------------------

def test_each_run_of_image_pads_becomes_one_pad():
    assert collapse_image_runs([1, 7, 9, 9, 9, 8, 2, 7, 9, 9, 8], 9) == [1, 7, 9, 8, 2, 7, 9, 8]
    assert collapse_image_runs([9, 9, 1], 9) == [9, 1]
    assert collapse_image_runs([1, 2], 9) == [1, 2]


def test_images_travel_as_data_uris():
    data = png_bytes(synthetic_image(0, size=8))
    uri = image_data_uri(data)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == data


def test_an_image_prompt_without_image_token_id_or_with_missing_pads_is_refused():
    prompt = Prompt(index=3, prompt_ids=[1, 5, 2], images=[b"png"])
    with pytest.raises(ValueError, match="without image_token_id"):
        RolloutClient(["http://127.0.0.1:9"])._prompt_request(prompt)
    with pytest.raises(ValueError, match="carries 1 image.* 0 run"):
        RolloutClient(["http://127.0.0.1:9"], image_token_id=IMAGE_PAD_ID)._prompt_request(prompt)


# ---- against the server ---------------------------------------------------------------------------

def test_greedy_image_prompt_matches_transformers(client, vl_model):
    prompt = image_prompt(vl_model, 0, (32,), "what is it?")
    assert prompt.prompt_ids.count(IMAGE_PAD_ID) == 16  # 32 x 32 pixels, 4-pixel patches, 2 x 2 merge
    sample = client.generate_groups([prompt], 1, SamplingParams(temperature=0.0, max_new_tokens=8))[0].samples[0]
    assert sample.prompt_ids == prompt.prompt_ids
    assert sample.routed_experts.shape == (len(prompt.prompt_ids) + len(sample.response_ids) - 1, TEXT_LAYERS, TOP_K)
    ref_logprobs, ref_greedy, _ = hf_reference(vl_model, prompt, sample.response_ids)
    worst = (torch.tensor(sample.rollout_logprobs) - ref_logprobs).abs().max().item()
    print(f"image prompt of {len(prompt.prompt_ids)} tokens, {len(sample.response_ids)} greedy tokens: "
          f"max |logprob SGLang - transformers| = {worst:.2e}")
    assert worst < LOGPROB_TOL
    assert sample.response_ids == ref_greedy


def test_groups_of_image_prompts_have_logprobs_and_routes(client, vl_model):
    prompts = [image_prompt(vl_model, 1, (32,), "count"), image_prompt(vl_model, 2, (32, 48), "compare")]
    groups = client.generate_groups(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6),
                                    [[10, 11, 12], [20, 21, 22]])
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        assert group.prompt is prompt and len(group.samples) == 3
        for sample in group.samples:
            assert 1 <= len(sample.response_ids) <= 6 and len(sample.rollout_logprobs) == len(sample.response_ids)
            assert sample.routed_experts.shape == (len(prompt.prompt_ids) + len(sample.response_ids) - 1,
                                                   TEXT_LAYERS, TOP_K)
            ref_logprobs, _, _ = hf_reference(vl_model, prompt, sample.response_ids)
            worst = max(worst, (torch.tensor(sample.rollout_logprobs) - ref_logprobs).abs().max().item())
    print(f"sampled groups (1 and 2 images): max |logprob SGLang - transformers| = {worst:.2e}")
    assert worst < LOGPROB_TOL
    assert len({tuple(s.response_ids) for s in groups[1].samples}) > 1, "different seeds gave identical samples"


def test_routed_experts_match_the_transformers_router(client, vl_model):
    prompt = image_prompt(vl_model, 3, (32, 48), "where?")
    sample = client.generate_groups([prompt], 1, SamplingParams(temperature=1.0, max_new_tokens=8), [[5]])[0].samples[0]
    _, _, ref_routes = hf_reference(vl_model, prompt, sample.response_ids)
    agree, total = route_agreement(sample.routed_experts, ref_routes)
    image_rows = np.zeros(len(ref_routes), dtype=bool)
    image_rows[:len(prompt.prompt_ids)] = np.asarray(prompt.prompt_ids) == IMAGE_PAD_ID
    image_agree, image_total = route_agreement(sample.routed_experts[image_rows], ref_routes[image_rows])
    print(f"routes agree on {agree}/{total} token-layers ({image_agree}/{image_total} on image tokens)")
    assert image_total == (16 + 36) * TEXT_LAYERS  # 32 x 32 and 48 x 48 pixels
    assert agree == total


def test_a_prompt_the_server_expands_differently_is_refused(client, vl_model):
    prompt = image_prompt(vl_model, 4, (32,), "x")
    first_pad = prompt.prompt_ids.index(IMAGE_PAD_ID)
    short = Prompt(index=4, prompt_ids=prompt.prompt_ids[:first_pad] + prompt.prompt_ids[first_pad + 1:],
                   images=prompt.images)
    n = len(prompt.prompt_ids)
    with pytest.raises(RolloutError, match=f"read the prompt as {n} tokens, we have {n - 1}"):
        client.generate_groups([short], 1, SamplingParams(temperature=0.0, max_new_tokens=2))
