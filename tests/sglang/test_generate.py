"""Generation through the RL client against a real SGLang server on CPU (fp32 tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.models.qwen3_moe import moe_layer_pattern, read_hf_config
from megatron_sapo.rollout.client import RolloutClient, RoutedExperts, SamplingParams
from megatron_sapo.types import Prompt

from sglang_reference import hf_logprobs_and_routes

pytestmark = pytest.mark.sglang

PROMPTS = [Prompt(index=0, prompt_ids=[5, 17, 33, 100, 7]), Prompt(index=1, prompt_ids=[200, 3, 3, 9])]


def make_client(manager, tiny_models, **kwargs) -> RolloutClient:
    hf = read_hf_config(tiny_models[0])
    return RolloutClient(manager.urls, routed_experts=RoutedExperts(moe_layer_pattern(hf), hf["num_experts_per_tok"]),
                         **kwargs)


def test_groups_are_complete_and_seeded(manager, tiny_models):
    client = make_client(manager, tiny_models)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    seeds = [[100 + j for j in range(4)], [200 + j for j in range(4)]]
    groups = client.generate_groups(PROMPTS, 4, sampling, seeds)
    assert [g.prompt.index for g in groups] == [0, 1]
    for group in groups:
        assert len(group.samples) == 4
        for sample in group.samples:
            assert sample.prompt_ids == group.prompt.prompt_ids
            assert 1 <= len(sample.response_ids) <= 6
            assert len(sample.rollout_logprobs) == len(sample.response_ids)
            assert sample.finish_reason in ("stop", "length")
            assert sample.weight_version is not None
    again = client.generate_groups(PROMPTS, 4, sampling, seeds)
    assert [[s.response_ids for s in g.samples] for g in again] == [[s.response_ids for s in g.samples] for g in groups]
    distinct = {tuple(s.response_ids) for s in groups[0].samples}
    assert len(distinct) > 1, "different seeds gave identical samples"


def test_logprobs_and_routes_match_transformers(manager, tiny_models):
    client = make_client(manager, tiny_models)
    groups = client.generate_groups(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=8), [[1, 2], [3, 4]])
    moe = np.asarray(moe_layer_pattern(read_hf_config(tiny_models[0])))
    worst, agree, total = 0.0, 0, 0
    for sample in (s for g in groups for s in g.samples):
        ref_logprobs, ref_routes = hf_logprobs_and_routes(tiny_models[0], sample.prompt_ids, sample.response_ids)
        worst = max(worst, (torch.tensor(sample.rollout_logprobs) - ref_logprobs).abs().max().item())
        ours = np.sort(sample.routed_experts, -1)
        theirs = np.sort(ref_routes.numpy()[:, moe, :], -1)
        assert ours.shape == theirs.shape
        agree += int((ours == theirs).all(-1).sum())
        total += ours.shape[0] * ours.shape[1]
    print(f"max |logprob SGLang - transformers| = {worst:.2e}; routes agree on {agree}/{total} token-layers")
    assert worst < 2e-2
    assert agree == total


def test_bad_seeds_shape_is_rejected(manager, tiny_models):
    client = make_client(manager, tiny_models)
    with pytest.raises(ValueError, match="seeds must be"):
        client.generate_groups(PROMPTS, 2, SamplingParams(max_new_tokens=2), [[1, 2]])
