"""Rank 0's rollout, generated up to ``rollout.max_staleness`` steps ahead of the trainer.

Weight versions are counted in RL steps: version ``v`` is the policy after step ``v``'s updates
(0: the start model), which the servers report as ``"step-v"`` (any other string: the start
weights, which a restarted server serves too). Step ``n`` trains the policy of version
``n - 1`` on its groups; their *staleness* is ``n - 1`` minus the version that sampled them
(the oldest token's, when a sync came mid-response). With bounded staleness ``k`` the groups of
step ``m`` may come from version ``m - 1 - k`` at the oldest, so step ``m`` is submitted as soon
as the servers hold that version:

* :meth:`groups` ``(n)`` submits every step ``m <= v + 1 + k`` not yet submitted (``v``: the
  servers' version), then waits for step ``n``'s groups;
* :meth:`before_sync`, ``rollout.partial = "wait"``: waits for every submitted step, so no sync
  ever lands in the middle of a generation; ``"abort"`` / ``"continue"``: pauses the servers,
  and the client samples the stopped requests again from the start, or continues them from
  their prefix, once they continue (``rollout/client.py``);
* :meth:`after_sync` ``(v)`` continues paused servers and, with ``k >= 1``, submits what version
  ``v`` allows, so the next steps generate during evaluation and checkpointing too.

With ``k = 0`` nothing generates while the trainer trains: step ``n`` is submitted when the
trainer asks for it, with the same prompts, seeds and request ids as a loop without this module.
With ``k >= 1`` and ``"wait"`` each step's groups come from one defined version,
``max(0, m - 1 - k)``, with seeds derived from (seed, step, prompt, sample): a seeded run is
reproducible whatever the timing. ``"abort"`` and ``"continue"`` are not (which requests a sync
interrupts, and so which version samples them, depends on timing); their bound still holds.

Prompts are drawn from the sampler when a step is submitted, in step order. A checkpoint
records every submitted step not yet trained (:meth:`state_dict`): the groups of finished steps
(they may come from weights older than the checkpoint's, so they are data), and the prompts of
steps in flight, which a resumed run submits again under the checkpoint's weights with the same
seeds. Under ``"wait"`` a step in flight at a checkpoint was submitted under the checkpoint's
own weights, so a resumed run regenerates it exactly.

At the 30B-A3B job (``k = 1``, 1,024 responses of up to 18,432 tokens a step): rank 0 holds at
most two steps of groups, about 19 M tokens each; as Python lists of ids and log-probs that is
up to 1.4 GB a step (R3 routes add 384 bytes a token once compacted to uint8). A checkpoint's
``rollout_pipeline.pt`` holds the finished step in the same form.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import sys
import threading
import time
from dataclasses import dataclass

import torch

from megatron_sapo.config import RolloutConfig
from megatron_sapo.rollout.client import RolloutClient, SamplingParams, version_step
from megatron_sapo.types import Group, Prompt, Sample

STATE_FILE = "rollout_pipeline.pt"


def sample_seed(base: int | None, step: int, prompt_index: int, sample_index: int) -> int | None:
    """The sampling seed of one response: derived from the base seed, the step, the prompt and
    the sample's index in its group (None without a base seed)."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}/{step}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def staleness(sample: Sample, step: int) -> int:
    """How many versions the oldest token of ``sample`` lags the policy step ``step`` trains."""
    return step - 1 - version_step(sample.weight_version)


@dataclass
class _Step:
    step: int
    prompt_indices: list[int]
    version: int
    """The servers' version when the step was submitted."""
    future: concurrent.futures.Future | None = None
    groups: list[Group] | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    """``time.perf_counter()`` when the step was submitted and when its last sample came back
    (None for a step a checkpoint gave back finished)."""

    def finished(self) -> bool:
        return self.groups is not None or (self.future is not None and self.future.done()
                                           and self.future.exception() is None)

    def result(self) -> list[Group]:
        if self.groups is None:
            self.groups = self.future.result()
        return self.groups


class RolloutPipeline:
    """Rank 0: the groups of each step (see the module docstring). Generation runs in a
    background thread's event loop; every method is called from the trainer's thread."""

    def __init__(self, client: RolloutClient, prompts: list[Prompt], sampler, cfg: RolloutConfig, *,
                 version: int, last_step: int) -> None:
        self.client = client
        self.prompts = prompts
        self.sampler = sampler
        self.cfg = cfg
        self.version = version
        """The weight version the servers hold."""
        self.last_step = last_step
        self._steps: dict[int, _Step] = {}
        self.spans: dict[int, tuple[float, float]] = {}
        """Per step taken: when its generation was submitted and when it finished (perf_counter)."""
        self._next = version + 1
        self._paused = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout", daemon=True)
        self._thread.start()

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              max_new_tokens=self.cfg.max_new_tokens)

    # ---- the trainer's side -------------------------------------------------------------------

    def groups(self, step: int) -> list[Group]:
        """Step ``step``'s groups, once generated (submitting what the bound allows first)."""
        self._submit_allowed()
        if step not in self._steps:
            raise RuntimeError(f"step {step} was never submitted (submitted: {sorted(self._steps)}; "
                               f"servers at version {self.version})")
        pending = self._steps[step]
        groups = pending.result()  # still listed while it runs: a sync meanwhile pauses it
        del self._steps[step]
        if pending.submitted_at is not None:
            self.spans[step] = (pending.submitted_at, pending.finished_at or time.perf_counter())
        return groups

    def before_sync(self) -> None:
        """Before the weights change: let generation finish ("wait") or pause it."""
        if self.cfg.partial == "wait":
            for pending in self._steps.values():
                pending.result()
        elif any(not pending.finished() for pending in self._steps.values()):
            if self.client.all_healthy():
                self.client.pause_for_sync()
                self._paused = True
            else:  # a server down or restarting cannot be paused: let the generation finish instead
                for pending in self._steps.values():
                    pending.result()

    def after_sync(self, version: int) -> None:
        """The servers now hold ``version``: continue, and generate ahead as far as it allows."""
        self.version = version
        if self._paused:
            self.client.continue_generation()
            self._paused = False
        if self.cfg.max_staleness:
            self._submit_allowed()

    def resample(self, step: int, groups: list[Group], which: list[tuple[int, int]]) -> None:
        """Sample ``groups[g].samples[s]`` again for each ``(g, s)`` in ``which`` under the servers'
        weights, with the same seed (a sample from a restarted server's start weights)."""
        async def one(g: int, s: int) -> None:
            prompt = groups[g].prompt
            seed = sample_seed(self.cfg.sampling_seed, step, prompt.index, s)
            groups[g].samples[s] = await self.client.asample(prompt, self.sampling, seed,
                                                             f"step{step}-{prompt.index}-{s}-again")

        async def all_of() -> None:
            await asyncio.gather(*(one(g, s) for g, s in which))

        self._run(all_of())

    def more_groups(self, step: int, round_: int) -> list[Group]:
        """Another ``prompts_per_step`` prompts for step ``step`` (dynamic sampling's round
        ``round_`` >= 2), now, under the servers' weights; seeds differ from every other round's."""
        prompts = [self.prompts[i] for i in self.sampler.next_indices()]
        size = self.cfg.group_size
        seeds = [[sample_seed(self.cfg.sampling_seed, step, p.index, j + (round_ - 1) * size) for j in range(size)]
                 for p in prompts]
        return self._run(self.client.agenerate_groups(prompts, size, self.sampling, seeds,
                                                      rid_prefix=f"step{step}r{round_}"))

    def generate(self, prompts: list[Prompt], group_size: int, sampling: SamplingParams,
                 seeds: list[list[int | None]], rid_prefix: str) -> list[Group]:
        """Generate now (evaluation), beside whatever the pipeline has in flight."""
        return self._run(self.client.agenerate_groups(prompts, group_size, sampling, seeds, rid_prefix))

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The steps submitted and not yet trained: finished ones with their groups, the others
        with their prompts (see the module docstring)."""
        steps = []
        for pending in sorted(self._steps.values(), key=lambda p: p.step):
            groups = pending.result() if pending.finished() else None
            steps.append({"step": pending.step, "prompt_indices": pending.prompt_indices, "version": pending.version,
                          "groups": None if groups is None else [_encode_group(g) for g in groups]})
        return {"version": self.version, "next_step": self._next, "steps": steps}

    def load_state_dict(self, state: dict) -> None:
        """Take back a checkpoint's steps: finished ones as they were, the others submitted
        again with their prompts and seeds under the servers' (the checkpoint's) weights."""
        self._next = int(state["next_step"])
        for saved in state["steps"]:
            pending = _Step(step=saved["step"], prompt_indices=list(saved["prompt_indices"]), version=saved["version"])
            if saved["groups"] is not None:
                pending.groups = [_decode_group(g, self.prompts) for g in saved["groups"]]
                self._steps[pending.step] = pending
            else:
                pending.version = self.version
                self._submit(pending)

    def close(self) -> None:
        """Cancel the generation in flight (its requests are dropped) and stop the thread; servers
        paused for a sync that never came (a failure in between) are let go."""
        if self._paused:
            try:
                self.client.continue_generation()
            except Exception as err:  # the run is ending: say so, do not hide why it ends
                print(f"could not continue the paused servers: {err}", file=sys.stderr, flush=True)
            self._paused = False
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()

    # ---- internals ------------------------------------------------------------------------------

    def _submit_allowed(self) -> None:
        while self._next <= min(self.version + 1 + self.cfg.max_staleness, self.last_step):
            self._submit(_Step(step=self._next, prompt_indices=self.sampler.next_indices(), version=self.version))
            self._next += 1

    def _submit(self, pending: _Step) -> None:
        prompts = [self.prompts[i] for i in pending.prompt_indices]
        size = self.cfg.group_size
        seeds = [[sample_seed(self.cfg.sampling_seed, pending.step, p.index, j) for j in range(size)] for p in prompts]
        pending.submitted_at = time.perf_counter()
        pending.future = asyncio.run_coroutine_threadsafe(
            self.client.agenerate_groups(prompts, size, self.sampling, seeds, rid_prefix=f"step{pending.step}"),
            self._loop)
        pending.future.add_done_callback(lambda _: setattr(pending, "finished_at", time.perf_counter()))
        self._steps[pending.step] = pending

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _encode_group(group: Group) -> dict:
    return {"prompt_index": group.prompt.index, "samples": [
        {"prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "rollout_logprobs": s.rollout_logprobs,
         "finish_reason": s.finish_reason, "weight_version": s.weight_version, "token_versions": s.token_versions,
         "routed_experts": None if s.routed_experts is None else torch.from_numpy(s.routed_experts)}
        for s in group.samples]}


def _decode_group(saved: dict, prompts: list[Prompt]) -> Group:
    samples = []
    for s in saved["samples"]:
        routes = s["routed_experts"]
        versions = s["token_versions"]
        samples.append(Sample(prompt_ids=list(s["prompt_ids"]), response_ids=list(s["response_ids"]),
                              rollout_logprobs=list(s["rollout_logprobs"]), finish_reason=s["finish_reason"],
                              weight_version=s["weight_version"],
                              token_versions=None if versions is None else [tuple(v) for v in versions],
                              routed_experts=None if routes is None else routes.numpy()))
    return Group(prompt=prompts[saved["prompt_index"]], samples=samples)
