"""Async RL client for SGLang's ``/generate``, spread over one or more servers.

One request per sample, so every sample carries its own ``rid`` (for abort) and its own
``sampling_seed`` (so a sample does not depend on which other requests share a batch, which
is what makes rollouts reproducible across resumed runs). Each request goes to the server with
the fewest requests in flight. A failed request (connection error, timeout, HTTP error,
malformed or aborted output) is retried on another server after a backoff, up to
``max_retries`` times; a caller-provided ``on_failure`` hook (the server manager) may restart
a dead server meanwhile. When retries run out the whole call fails with :class:`RolloutError`:
a batch is never silently short.

A prompt with images (Qwen-VL) is sent as ``input_ids`` plus ``image_data`` (one base64 data URI
per image). Our ``prompt_ids`` hold each image already expanded by the processor into its run of
``<|image_pad|>`` tokens, but SGLang 0.5.23 expands ``input_ids`` itself, one image per pad
token (expanded ids fail with an HTTP 500): each run is therefore collapsed to one pad token in
the request. The server's expansion must give back ``prompt_ids`` exactly, which the answer's
``prompt_tokens`` confirms, so log-probs and routed experts stay aligned with ``prompt_ids``.
"""

from __future__ import annotations

import asyncio
import base64
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp

from megatron_sapo.rollout.routed_experts import decode_routed_experts
from megatron_sapo.types import Group, Prompt, Sample

FINISH_REASONS = ("stop", "length", "abort")


def version_step(version: str | None) -> int:
    """The RL step of a weight version the servers report ("step-N"; anything else: 0, the start
    weights, which a restarted server serves too)."""
    if version and version.startswith("step-") and version[5:].isdigit():
        return int(version[5:])
    return 0


class RolloutError(RuntimeError):
    """Generation failed after all retries, or a server's answer cannot be used."""


class _BadOutput(ValueError):
    """A server answered, but not with a usable sample (retried like a failure)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    """Extra tokens that end a response (the model's EOS always does)."""

    def to_request(self, seed: int | None) -> dict:
        params = {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if seed is not None:
            params["sampling_seed"] = seed
        return params


@dataclass
class RoutedExperts:
    """What the client needs to decode routed experts (R3)."""

    moe_layers: tuple[bool, ...]
    top_k: int


class RolloutClient:
    def __init__(self, urls: list[str], *, request_timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 1.0, routed_experts: RoutedExperts | None = None,
                 on_failure: Callable[[str], Awaitable[None] | None] | None = None,
                 image_token_id: int | None = None, partial: str = "abort") -> None:
        """``image_token_id``: the model's image placeholder (``config.json`` ``image_token_id``),
        needed only for prompts with images. ``partial``: what becomes of a request that
        :meth:`pause_for_sync` stopped: "abort" samples it again from the start, "continue"
        continues it from the tokens it had (``rollout.partial``)."""
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.routed_experts = routed_experts
        self.on_failure = on_failure
        self.image_token_id = image_token_id
        self.partial = partial
        self.retries = 0
        """Requests retried since the client was made (for metrics)."""
        self.sync_interrupted = 0
        """Requests a pause for a weight sync stopped (sampled again or continued)."""
        self._pauses = 0
        self._pausing = False
        self._in_flight = dict.fromkeys(self.urls, 0)

    # ---- generation ---------------------------------------------------------------------------

    def generate_groups(self, prompts: list[Prompt], group_size: int, sampling: SamplingParams,
                        seeds: list[list[int | None]] | None = None, rid_prefix: str = "s") -> list[Group]:
        """Sample ``group_size`` responses for every prompt (blocking wrapper)."""
        return asyncio.run(self.agenerate_groups(prompts, group_size, sampling, seeds, rid_prefix))

    async def agenerate_groups(self, prompts: list[Prompt], group_size: int, sampling: SamplingParams,
                               seeds: list[list[int | None]] | None = None, rid_prefix: str = "s") -> list[Group]:
        """``seeds[i][j]`` is the sampling seed of sample ``j`` of prompt ``i`` (None: unseeded)."""
        if seeds is None:
            seeds = [[None] * group_size for _ in prompts]
        if len(seeds) != len(prompts) or any(len(s) != group_size for s in seeds):
            raise ValueError(f"seeds must be [{len(prompts)} prompts][{group_size} samples]")
        # Once per prompt, not per sample: image prompts carry their pictures base64-encoded.
        requests = [self._prompt_request(p) for p in prompts]
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            jobs = [self._sample(session, p.prompt_ids, requests[i], sampling, seeds[i][j],
                                 f"{rid_prefix}-{p.index}-{j}")
                    for i, p in enumerate(prompts) for j in range(group_size)]
            samples = await asyncio.gather(*jobs)
        return [Group(prompt=p, samples=list(samples[i * group_size:(i + 1) * group_size]))
                for i, p in enumerate(prompts)]

    async def asample(self, prompt: Prompt, sampling: SamplingParams, seed: int | None, rid: str) -> Sample:
        """One response to ``prompt``."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await self._sample(session, prompt.prompt_ids, self._prompt_request(prompt), sampling, seed, rid)

    async def _sample(self, session, prompt_ids: list[int], prompt_request: dict, sampling: SamplingParams,
                      seed: int | None, rid: str) -> Sample:
        """One response, across failures (retried with backoff) and pauses for a weight sync
        (sampled again, or continued from its prefix with ``partial = "continue"``)."""
        sampled = _Prefix()
        failures: list[str] = []
        failed: set[str] = set()  # servers that failed this request: retried elsewhere while any other is up
        request_rid = rid
        while True:
            remaining = sampling.max_new_tokens - len(sampled.response_ids)
            if remaining <= 0:  # a pause came after the last token: the response is complete
                return sampled.finished(prompt_ids, "length")
            body = {**prompt_request, "rid": request_rid, "return_logprob": True,
                    "input_ids": prompt_request["input_ids"] + sampled.response_ids,
                    "sampling_params": {**sampling.to_request(seed), "max_new_tokens": remaining},
                    "logprob_start_len": len(prompt_ids) + len(sampled.response_ids) - 1}
            if self.routed_experts is not None:
                body["return_routed_experts"] = True
            pauses = self._pauses
            url = min([u for u in self.urls if u not in failed] or self.urls, key=lambda u: self._in_flight[u])
            self._in_flight[url] += 1
            try:
                async with session.post(f"{url}/generate", json=body) as response:
                    if response.status != 200:
                        raise _BadOutput(f"HTTP {response.status}: {(await response.text())[:200]}")
                    piece = self._parse(await response.json(), prompt_ids + sampled.response_ids)
                if piece.finish_reason == "abort" and not self._paused_since(pauses):
                    raise _BadOutput("generation was aborted")
            except (aiohttp.ClientError, asyncio.TimeoutError, _BadOutput) as err:
                if self._paused_since(pauses):  # our pause stopped it before it ran (SGLang answers an error)
                    self.sync_interrupted += 1
                    request_rid = f"{rid}-sync{self._pauses}"
                    continue
                failures.append(f"{url}: {type(err).__name__}: {err}")
                failed.add(url)
                await self._report_failure(url)
                if len(failures) > self.max_retries:
                    raise RolloutError(f"request {rid} failed {len(failures)} times: " + "; ".join(failures))
                self.retries += 1
                await asyncio.sleep(self.backoff_s * 2 ** (len(failures) - 1))
                request_rid = f"{rid}-retry{len(failures)}"
                continue
            finally:
                self._in_flight[url] -= 1
            if piece.finish_reason != "abort":
                return sampled.then(piece).finished(prompt_ids, piece.finish_reason, piece.routed_experts)
            # Our pause for a weight sync stopped it; the request waits for the servers to continue.
            self.sync_interrupted += 1
            if self.partial == "continue":
                sampled = sampled.then(piece)
            request_rid = f"{rid}-sync{self._pauses}"

    def _prompt_request(self, prompt: Prompt) -> dict:
        """The prompt part of a ``/generate`` body: ``input_ids``, and ``image_data`` with images."""
        if not prompt.images:
            return {"input_ids": list(prompt.prompt_ids)}
        if self.image_token_id is None:
            raise ValueError(f"prompt {prompt.index} has images but the RolloutClient was made without "
                             "image_token_id (the model's config.json image_token_id)")
        input_ids = collapse_image_runs(prompt.prompt_ids, self.image_token_id)
        runs = input_ids.count(self.image_token_id)
        if runs != len(prompt.images):
            raise ValueError(f"prompt {prompt.index} carries {len(prompt.images)} image(s) but its prompt_ids hold "
                             f"{runs} run(s) of the image token {self.image_token_id}")
        return {"input_ids": input_ids, "image_data": [image_data_uri(image) for image in prompt.images]}

    def _paused_since(self, pauses: int) -> bool:
        """Whether a pause for a weight sync began after a request was sent (``pauses``: the count
        then) or is still being posted to the servers (one after another)."""
        return self._pauses != pauses or self._pausing

    async def _report_failure(self, url: str) -> None:
        """The caller's hook (the server manager's restart), off the event loop: a restart takes
        seconds to minutes, and other requests and steps keep going meanwhile."""
        if self.on_failure is None:
            return
        if asyncio.iscoroutinefunction(self.on_failure):
            await self.on_failure(url)
        else:
            await asyncio.to_thread(self.on_failure, url)

    def _parse(self, out: dict, prompt_ids: list[int]) -> Sample:
        try:
            meta = out["meta_info"]
            response_ids = [int(t) for t in out["output_ids"]]
            token_logprobs = meta["output_token_logprobs"]
            finish = meta["finish_reason"]["type"] if meta.get("finish_reason") else "abort"
        except (KeyError, TypeError, ValueError) as err:
            raise _BadOutput(f"malformed /generate answer ({type(err).__name__}: {err})") from None
        if finish not in FINISH_REASONS:
            raise _BadOutput(f"unknown finish reason {finish!r}")
        if meta.get("prompt_tokens") is not None and meta["prompt_tokens"] != len(prompt_ids):
            raise RolloutError(f"the server read the prompt as {meta['prompt_tokens']} tokens, we have "
                               f"{len(prompt_ids)}: its processor expands images differently from ours (a "
                               "different processor_config.json in the served folder?)")
        logprobs = [entry[0] for entry in token_logprobs]
        if len(logprobs) != len(response_ids) or [int(e[1]) for e in token_logprobs] != response_ids:
            raise _BadOutput(f"{len(response_ids)} output tokens but log-probs for {len(logprobs)} "
                             "(or for other tokens)")
        if any(lp is None or not math.isfinite(lp) for lp in logprobs):
            raise RolloutError("the server returned NaN or infinite log-probs: the served model computes "
                               "non-finite logits (check its weights and dtype)")
        routes = None
        if self.routed_experts is not None and finish != "abort":
            if "routed_experts" not in meta or meta["routed_experts"] is None:
                raise RolloutError("routed experts were requested but not returned: start the server with "
                                   "--return-routed-experts")
            routes = decode_routed_experts(meta["routed_experts"], num_tokens=len(prompt_ids) + len(response_ids) - 1,
                                           moe_layers=self.routed_experts.moe_layers, top_k=self.routed_experts.top_k)
        return Sample(prompt_ids=list(prompt_ids), response_ids=response_ids, rollout_logprobs=logprobs,
                      finish_reason=finish, weight_version=meta.get("weight_version"), routed_experts=routes)

    # ---- control ------------------------------------------------------------------------------

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop generating on every server ("abort": drop requests in flight; "retract"/"in_place": keep)."""
        self._post_all("/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._post_all("/continue_generation", {})
        self._pausing = False

    def pause_for_sync(self) -> None:
        """Pause every server for a weight sync, aborting the requests in flight: they return
        what they sampled so far and are sent again (see ``partial``), to run once the servers
        continue. Call :meth:`continue_generation` after the sync."""
        self._pauses += 1  # before the pause: an abort it causes must be recognised as ours
        self._pausing = True  # until continue_generation: servers are paused one after another
        self.pause_generation("abort")

    def flush_cache(self) -> None:
        self._post_all("/flush_cache", None)

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache", "weights")) -> None:
        """Free the servers' GPU memory while the trainer needs it (``--enable-memory-saver``)."""
        self._post_all("/release_memory_occupation", {"tags": list(tags)})

    def resume_memory(self, tags: tuple[str, ...]) -> None:
        self._post_all("/resume_memory_occupation", {"tags": list(tags)})

    def abort(self, rid: str | None = None) -> None:
        """Abort one request by ``rid``, or all requests on every server."""
        self._post_all("/abort_request", {"rid": rid} if rid else {"abort_all": True})

    def all_healthy(self) -> bool:
        """Whether every server answers ``/health`` now."""
        import requests

        for url in self.urls:
            try:
                if requests.get(f"{url}/health", timeout=10).status_code != 200:
                    return False
            except requests.RequestException:
                return False
        return True

    def weight_versions(self) -> dict[str, str]:
        """The weight version each server reports."""
        import requests

        return {url: requests.get(f"{url}/model_info", timeout=30).json()["weight_version"]
                for url in self.urls}

    def _post_all(self, path: str, body: dict | None) -> None:
        import requests

        for url in self.urls:
            response = requests.post(f"{url}{path}", json=body, timeout=self.request_timeout_s)
            if response.status_code != 200:
                raise RolloutError(f"{url}{path}: HTTP {response.status_code}: {response.text[:200]}")


@dataclass
class _Prefix:
    """What a request sampled before pauses for weight syncs stopped it (``partial = "continue"``)."""

    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[tuple[int, str | None]] = field(default_factory=list)
    """(first response token, weight version) of each piece."""

    def then(self, piece: Sample) -> "_Prefix":
        versions = list(self.versions)
        if piece.response_ids and versions and versions[-1][0] == len(self.response_ids):
            versions.pop()  # the last piece sampled no token
        if not versions or (piece.response_ids and versions[-1][1] != piece.weight_version):
            versions.append((len(self.response_ids), piece.weight_version))
        return _Prefix(self.response_ids + piece.response_ids, self.logprobs + piece.rollout_logprobs, versions)

    def finished(self, prompt_ids: list[int], finish_reason: str, routes=None) -> Sample:
        """The whole response; its ``weight_version`` is the oldest version that sampled a token."""
        versions = self.versions or [(0, None)]
        oldest = min((v for _, v in versions), key=version_step)  # a restarted server's may come later
        return Sample(prompt_ids=list(prompt_ids), response_ids=self.response_ids, rollout_logprobs=self.logprobs,
                      finish_reason=finish_reason, weight_version=oldest, routed_experts=routes,
                      token_versions=versions if len({v for _, v in versions}) > 1 else None)


def collapse_image_runs(prompt_ids: list[int], image_token_id: int) -> list[int]:
    """``prompt_ids`` with every run of consecutive ``image_token_id`` reduced to one token (the
    form SGLang expands itself). Images are separated by vision start/end tokens, so each run is
    one image."""
    return [t for i, t in enumerate(prompt_ids)
            if t != image_token_id or i == 0 or prompt_ids[i - 1] != image_token_id]


_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                     (b"RIFF", "image/webp"))


def image_data_uri(data: bytes) -> str:
    """An encoded image file as a base64 data URI (SGLang decodes the bytes whatever the type says)."""
    mime = next((m for signature, m in _IMAGE_SIGNATURES if data.startswith(signature)), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
