"""The rollout pipeline's schedule, with a client that records what it is asked and answers at
once with the servers' version (the real server: tests/sglang/test_pipeline.py and the e2e runs):
which step is submitted when, under which version, with which prompts, seeds and request ids;
k = 0 asks exactly what the loop without the pipeline asked; a checkpoint's state comes back."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from megatron_sapo.config import RolloutConfig
from megatron_sapo.data.datasets import PromptSampler
from megatron_sapo.rollout.pipeline import RolloutPipeline, sample_seed, staleness, version_step
from megatron_sapo.types import Group, Prompt, Sample

PROMPTS = [Prompt(index=i, prompt_ids=[10 + i, 3]) for i in range(12)]


class RecordingClient:
    def __init__(self, slow: str | None = None) -> None:
        self.version = "default"
        self.calls: list[dict] = []
        self.slow = slow
        """A step (rid prefix) that takes 5 s: in flight when a checkpoint is taken."""

    async def agenerate_groups(self, prompts, group_size, sampling, seeds, rid_prefix):
        self.calls.append({"prompts": [p.index for p in prompts], "seeds": seeds, "rid_prefix": rid_prefix,
                           "version": self.version})
        if rid_prefix == self.slow:
            await asyncio.sleep(5)
        return [Group(prompt=p, samples=[Sample(prompt_ids=p.prompt_ids, response_ids=[7], rollout_logprobs=[-1.0],
                                                finish_reason="stop", weight_version=self.version)
                                         for _ in range(group_size)]) for p in prompts]


def make(k: int, *, version: int = 0, last_step: int = 10, slow: str | None = None):
    cfg = RolloutConfig(group_size=2, prompts_per_step=3, max_staleness=k, sampling_seed=99)
    client = RecordingClient(slow)
    client.version = f"step-{version}" if version else "default"
    sampler = PromptSampler(len(PROMPTS), 3, seed=5, shuffle=True)
    return RolloutPipeline(client, PROMPTS, sampler, cfg, version=version, last_step=last_step), client, sampler


def run_steps(pipeline, client, steps):
    """The loop's order: take the step's groups, train (nothing here), sync the new version."""
    taken = {}
    for step in steps:
        taken[step] = pipeline.groups(step)
        pipeline.before_sync()
        client.version = f"step-{step}"
        pipeline.after_sync(step)
    return taken


def test_k0_asks_what_the_loop_asked_before_the_pipeline():
    """Step n's prompts are the sampler's next, seeds blake2b(base/step/prompt/sample), rid
    prefix "step{n}", asked when step n starts under the weights of step n - 1."""
    pipeline, client, _ = make(0)
    reference = PromptSampler(len(PROMPTS), 3, seed=5, shuffle=True)
    try:
        run_steps(pipeline, client, range(1, 4))
    finally:
        pipeline.close()
    for step, call in enumerate(client.calls, start=1):
        indices = reference.next_indices()
        assert call["prompts"] == indices and call["rid_prefix"] == f"step{step}"
        digest = [[int.from_bytes(hashlib.blake2b(f"99/{step}/{p}/{j}".encode(), digest_size=8).digest(), "little") >> 2
                   for j in range(2)] for p in indices]
        assert call["seeds"] == digest
        assert call["version"] == ("default" if step == 1 else f"step-{step - 1}")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_step_is_generated_k_versions_back_and_never_older(k):
    pipeline, client, _ = make(k, last_step=8)
    try:
        taken = run_steps(pipeline, client, range(1, 9))
    finally:
        pipeline.close()
    assert [c["rid_prefix"] for c in client.calls] == [f"step{s}" for s in range(1, 9)]  # each once, in order
    for step, groups in taken.items():
        ages = {staleness(s, step) for g in groups for s in g.samples}
        assert ages == {min(k, step - 1)}, (step, ages)  # reaches k once there are k steps behind


def test_the_state_of_a_checkpoint_comes_back_and_continues_the_same():
    """Stopped after step 3 at k = 2: steps 4 and 5 finished (saved with their groups), step 6
    in flight under the checkpoint's version 3 (saved as its prompts). A pipeline built from the
    state takes the same groups, asks step 6 again exactly as it was asked, then step 7 like a
    pipeline that ran on."""
    straight, client, _ = make(2)
    stopped, stopped_client, sampler = make(2, slow="step6")
    try:
        run_steps(straight, client, range(1, 8))
        run_steps(stopped, stopped_client, range(1, 4))
        time.sleep(0.5)  # steps 4 and 5 answer at once; step 6 takes 5 s
        state, cursor = stopped.state_dict(), sampler.state_dict()
        assert [(s["step"], s["groups"] is not None) for s in state["steps"]] == [(4, True), (5, True), (6, False)]
    finally:
        stopped.close()
    resumed, resumed_client, resumed_sampler = make(2, version=3)
    resumed_sampler.load_state_dict(cursor)
    try:
        resumed.load_state_dict(state)
        taken = run_steps(resumed, resumed_client, range(4, 8))
    finally:
        resumed.close(), straight.close()
    assert [c["rid_prefix"] for c in resumed_client.calls] == [f"step{m}" for m in range(6, 11)]
    assert resumed_client.calls == client.calls[5:]
    assert [version_step(g.samples[0].weight_version) for g in taken[4]] == [1, 1, 1]


def test_a_step_never_submitted_is_a_clear_error():
    pipeline, _, _ = make(0)
    try:
        with pytest.raises(RuntimeError, match="step 3 was never submitted"):
            pipeline.groups(3)
    finally:
        pipeline.close()


def test_seeds_and_versions():
    assert sample_seed(None, 1, 2, 3) is None
    assert version_step("step-12") == 12 and version_step("default") == 0 and version_step(None) == 0
    assert version_step("step-x") == 0
