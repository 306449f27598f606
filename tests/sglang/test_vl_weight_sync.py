"""Weight sync of a Qwen3-VL-MoE from Megatron ranks into a running SGLang server (CPU, fp32).

One server for the module, on tiny Qwen3-VL-MoE model A. Each test first sends an image
prompt (so SGLang has seen that image under A's weights), loads model B into a Megatron layout
on 2 ranks (TP1 EP2), syncs it by one path and checks that the server now reports the new
weight version and serves what transformers computes with B, both for that image and for an
image it has not seen. The seen image is what catches stale vision features: SGLang caches an
image's vision-tower output by the image's hash across weight updates unless the cache is off
(``server_env`` turns it off). A is put back after each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch
import torch.distributed as dist

from megatron_sapo import models
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.models.tiny_vl import save_tiny_qwen3_vl_moe
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.parallel.spawn import spawn
from megatron_sapo.rollout.client import RolloutClient, SamplingParams
from megatron_sapo.rollout.manager import ServerManager
from megatron_sapo.rollout.server import ServerOptions
from megatron_sapo.rollout.weight_sync import ServerEndpoint, WeightSync
from megatron_sapo.types import Prompt, Sample
from megatron_sapo.parallel.ports import free_port
from vl_fixtures import hf_reference, image_prompt

pytestmark = pytest.mark.sglang

LOGPROB_TOL = 1e-3
"""fp32 on both sides (the unsynced server is within 1e-6 of transformers)."""
MODEL_GAP = 0.1
"""A and B must score the served response this differently, or a sync that changed nothing would pass."""
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def vl_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sglang_vl_sync_models")
    return tuple(save_tiny_qwen3_vl_moe(root / name, seed=seed, dtype=torch.float32)
                 for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture(scope="module")
def vl_manager(vl_models, tmp_path_factory):
    options = ServerOptions(model=str(vl_models[0]), port=free_port(), dtype="float32")
    logs = tmp_path_factory.mktemp("sglang_vl_sync_logs")
    with ServerManager([options], logs, startup_timeout_s=600) as manager:
        yield manager


@pytest.fixture(scope="module")
def client(vl_manager, vl_models) -> RolloutClient:
    image_token_id = models.read_hf_config(vl_models[0])["image_token_id"]
    return RolloutClient(vl_manager.urls, image_token_id=image_token_id)


def _sync_rank(hf_dir: str, url: str, path: str, version: str) -> None:
    parallel = ParallelConfig(tp=1, ep=2)
    pg = initialize_model_parallel(parallel)
    try:
        hf_config = models.read_hf_config(hf_dir)
        family = models.model_family(hf_config, f"{hf_dir}/config.json")
        spec = family.from_hf_config(hf_config, parallel, params_dtype=torch.float32)
        model = family.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp))
        table = models.weight_table(family, spec)
        load_hf_into_model(model, HFCheckpoint(hf_dir), table, pg)
        sync = WeightSync(model, table, pg, [ServerEndpoint(url)], path=path, bucket_bytes=64 * 1024,
                          hf_config=hf_config)
        sync.sync(version)
        sync.close()
    finally:
        destroy_model_parallel()


def _greedy(client: RolloutClient, prompt: Prompt) -> Sample:
    return client.generate_groups([prompt], 1, GREEDY)[0].samples[0]


def _compare(sample: Sample, model_dir: Path, prompt: Prompt) -> tuple[float, bool]:
    """Max |served - transformers| log-prob over the response, and whether the served greedy
    tokens are transformers' greedy tokens, for the model in ``model_dir``."""
    ref_logprobs, ref_greedy, _ = hf_reference(model_dir, prompt, sample.response_ids)
    diff = (torch.tensor(sample.rollout_logprobs) - ref_logprobs).abs().max().item()
    return diff, sample.response_ids == ref_greedy


@pytest.fixture
def restore_a(vl_manager, vl_models, client):
    yield
    url = vl_manager.urls[0]
    reload_a = {"model_path": str(vl_models[0]), "weight_version": "a"}
    for path, body in (("/begin_weight_update", {}), ("/update_weights_from_disk", reload_a),
                       ("/end_weight_update", {})):
        assert requests.post(url + path, json=body, timeout=300).status_code == 200
    assert client.weight_versions() == {url: "a"}


@pytest.mark.parametrize("path,first_image", [("tensor", 10), ("distributed", 20)])
def test_sync_serves_new_weights_for_seen_and_new_images(client, vl_models, restore_a, path, first_image):
    model_a, model_b = vl_models
    url = client.urls[0]
    seen = image_prompt(model_a, first_image, (32,), "what is it?")
    new = image_prompt(model_a, first_image + 1, (32,), "what is it?")

    diff, same_greedy = _compare(_greedy(client, seen), model_a, seen)
    assert diff < LOGPROB_TOL and same_greedy, f"the server does not serve A before the sync ({diff:.2e})"
    old_version = client.weight_versions()[url]

    version = f"vl-step-3-{path}"
    spawn(_sync_rank, 2, str(model_b), url, path, version)
    assert old_version != version and client.weight_versions() == {url: version}

    results = {}
    for label, prompt in (("seen before the sync", seen), ("new", new)):
        sample = _greedy(client, prompt)
        assert sample.weight_version == version
        gap, _ = _compare(sample, model_a, prompt)
        assert gap > MODEL_GAP, f"image {label}: A and B score the response alike ({gap:.2e})"
        results[label] = _compare(sample, model_b, prompt)
    print(f"{path} sync of B (TP1 EP2): max |logprob SGLang - transformers B| = " + ", ".join(
        f"{diff:.2e} (greedy {'equal' if same else 'differs'}) on the image {label}"
        for label, (diff, same) in results.items()))
    for label, (diff, same_greedy) in results.items():
        assert diff < LOGPROB_TOL and same_greedy, f"image {label}: the server does not serve B ({diff:.2e})"
