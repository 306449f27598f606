"""The rollout pipeline (``rollout/pipeline.py``) against the real SGLang server on CPU: two
steps generating at once (``max_staleness = 1``), a weight sync landing in the middle of them
(``partial = "continue"`` and ``"abort"``), and a server killed with both steps in flight.

A sync swaps the tiny model A for B (different random weights) on disk, so every token's
log-prob tells which weights sampled it: transformers scores each run of tokens under the model
its recorded version names, and the other model is checked to disagree (the test's sensitivity).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
import torch

from megatron_sapo.config import RolloutConfig
from megatron_sapo.data.datasets import PromptSampler
from megatron_sapo.rollout.client import RolloutClient
from megatron_sapo.rollout.pipeline import RolloutPipeline, version_step
from megatron_sapo.types import Prompt

from sglang_reference import hf_logprobs_and_routes

PROMPTS = [Prompt(index=i, prompt_ids=[5 + i, 17, 33, 100, 7]) for i in range(4)]
GROUP_SIZE, MAX_NEW_TOKENS = 4, 128
TOLERANCE = 2e-2  # SGLang against transformers, fp32 (tests/sglang/test_generate.py)


def serve(url: str, model: str, version: str) -> None:
    """Load ``model`` from disk into the server as ``version`` (SGLang's bracketed update)."""
    for path, body in (("/begin_weight_update", {}),
                       ("/update_weights_from_disk", {"model_path": model, "weight_version": version}),
                       ("/end_weight_update", {})):
        response = requests.post(url + path, json=body, timeout=300)
        assert response.status_code == 200, (path, response.text[:300])


def wait_until_decoding(url: str, deadline_s: float = 300.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        loads = requests.get(f"{url}/v1/loads", params={"include": "core"}, timeout=30).json()["loads"]
        if loads[0]["num_running_reqs"] > 0:
            return
        time.sleep(0.05)
    pytest.fail(f"the server ran no request within {deadline_s:.0f} s")


def make_pipeline(manager, partial: str, *, version: int, last_step: int) -> RolloutPipeline:
    cfg = RolloutConfig(group_size=GROUP_SIZE, prompts_per_step=2, max_new_tokens=MAX_NEW_TOKENS, max_staleness=1,
                        partial=partial, sampling_seed=7)
    client = RolloutClient(manager.urls, on_failure=manager.ensure_alive, backoff_s=0.5, partial=partial)
    sampler = PromptSampler(len(PROMPTS), cfg.prompts_per_step, seed=0, shuffle=False)
    return RolloutPipeline(client, PROMPTS, sampler, cfg, version=version, last_step=last_step)


def first_step_in_background(pipeline: RolloutPipeline) -> tuple[threading.Thread, dict]:
    """``pipeline.groups(first step)`` in a thread (it submits both steps and waits for the first)."""
    outcome: dict = {}

    def run():
        try:
            outcome["groups"] = pipeline.groups(pipeline.version + 1)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def check_complete(groups_by_step: dict[int, list]) -> list:
    """Every prompt of every step with its G samples: none lost, none twice."""
    samples = []
    for groups in groups_by_step.values():
        assert len(groups) == 2
        for group in groups:
            assert len(group.samples) == GROUP_SIZE
            for sample in group.samples:
                assert sample.prompt_ids == group.prompt.prompt_ids
                assert 1 <= len(sample.response_ids) <= MAX_NEW_TOKENS
                assert len(sample.rollout_logprobs) == len(sample.response_ids)
                assert sample.finish_reason in ("stop", "length")
                samples.append(sample)
    return samples


@pytest.fixture
def a_then_b(manager, tiny_models):
    """The server on A as version "step-0"; A again after the test."""
    serve(manager.urls[0], str(tiny_models[0]), "step-0")
    yield tuple(map(str, tiny_models))
    serve(manager.urls[0], str(tiny_models[0]), "step-0")


@pytest.mark.parametrize("partial", ["continue", "abort"])
def test_a_sync_mid_generation_pauses_and_every_token_keeps_its_version(manager, a_then_b, partial):
    model_a, model_b = a_then_b
    url = manager.urls[0]
    pipeline = make_pipeline(manager, partial, version=0, last_step=2)
    try:
        thread, outcome = first_step_in_background(pipeline)
        wait_until_decoding(url)
        pipeline.before_sync()
        serve(url, model_b, "step-1")
        pipeline.after_sync(1)
        thread.join(600)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        groups = {1: outcome["groups"], 2: pipeline.groups(2)}
    finally:
        pipeline.close()
    samples = check_complete(groups)
    interrupted = pipeline.client.sync_interrupted
    assert interrupted > 0, (f"the sync stopped no request ({pipeline.client.retries} retried): it came after the "
                             "generation")
    assert pipeline.client.retries == 0, "a request failed other than by the pause"

    by_version = {"step-0": model_a, "step-1": model_b}
    split, worst, other_best = 0, 0.0, float("inf")
    for sample in samples:
        runs = sample.token_versions or [(0, sample.weight_version)]
        if partial == "abort":
            assert sample.token_versions is None  # sampled again whole under the new weights
        split += len(runs) > 1
        bounds = [start for start, _ in runs[1:]] + [len(sample.response_ids)]
        for (start, version), end in zip(runs, bounds):
            own = by_version[version]
            other = model_b if own == model_a else model_a
            sampled = torch.tensor(sample.rollout_logprobs[start:end])
            own_ref, other_ref = (hf_logprobs_and_routes(m, sample.prompt_ids, sample.response_ids)[0][start:end]
                                  for m in (own, other))
            worst = max(worst, (sampled - own_ref).abs().max().item())
            other_best = min(other_best, (sampled - other_ref).abs().max().item())
    print(f"\npartial={partial}: {interrupted} requests stopped by the sync, {split} samples split across "
          f"versions; max |logprob - its version's transformers| = {worst:.1e}, the other model's at least "
          f"{other_best:.1e}")
    assert worst < TOLERANCE < other_best
    if partial == "continue":
        assert split > 0, "no response was continued across the sync"
    assert {version_step(s.weight_version) for s in samples} <= {0, 1}


def test_a_server_killed_with_two_steps_in_flight_loses_and_repeats_nothing(manager, a_then_b):
    """The restarted server serves the start weights (version 0): the loop would find those
    samples stale (``loop.rollout_groups``); here they are sampled again once the server holds the
    current weights, with the same seeds, and every group stays complete."""
    model_a, _ = a_then_b
    url = manager.urls[0]
    serve(url, model_a, "step-3")
    old_pid = manager.pids()[0]
    pipeline = make_pipeline(manager, "wait", version=3, last_step=5)
    try:
        thread, outcome = first_step_in_background(pipeline)
        wait_until_decoding(url)
        os.killpg(old_pid, signal.SIGKILL)
        thread.join(600)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        groups = {4: outcome["groups"], 5: pipeline.groups(5)}
        assert manager.pids()[0] != old_pid and pipeline.client.retries > 0
        samples = check_complete(groups)
        restarted = [s for s in samples if version_step(s.weight_version) == 0]
        assert restarted, "no sample came from the restarted server"
        serve(url, model_a, "step-3")
        for step, step_groups in groups.items():
            stale = [(g, s) for g, group in enumerate(step_groups) for s, sample in enumerate(group.samples)
                     if version_step(sample.weight_version) == 0]
            pipeline.resample(step, step_groups, stale)
    finally:
        pipeline.close()
    samples = check_complete(groups)
    assert {s.weight_version for s in samples} == {"step-3"}
    print(f"\nkill with 2 steps in flight: {pipeline.client.retries} requests retried, {len(restarted)} of "
          f"{len(samples)} samples came from the restarted server's start weights and were sampled again")
