"""Reward functions by name, and scoring a batch of responses without letting one hang a step.

A reward function takes ``(response_text, reference_answer)`` and returns a float. Built-in
ones are "math" (``math_answers``) and "exact_match" (the synthetic task's verifier); others
join with ``@register_reward("name")``.

Scoring runs the function in one worker process, one call at a time, because a thread cannot
be stopped: a call that outlives its timeout has its worker killed and replaced. The worker is
started with "spawn" (a fork of a trainer holding communicator threads is unsafe), so the
function must be importable by name (defined at module level). A call that raises, returns
something that is not a finite number, kills its worker or times out scores 0 and is counted;
the counts go back to the trainer for its logs.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
from dataclasses import dataclass
from typing import Callable, Sequence

from megatron_sapo.data.math_answers import math_reward
from megatron_sapo.errors import InputError

RewardFn = Callable[[str, "str | None"], float]

WORKER_START_TIMEOUT_S = 120.0


def exact_match_reward(response: str, answer: str | None) -> float:
    """1.0 when the response, stripped of surrounding whitespace, is exactly the answer."""
    return 1.0 if answer is not None and response.strip() == answer.strip() else 0.0


_REGISTRY: dict[str, RewardFn] = {"math": math_reward, "exact_match": exact_match_reward}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to the registry under ``name``."""

    def register(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if name not in _REGISTRY:
        raise InputError(f"unknown reward {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


@dataclass
class RewardScores:
    """Scores of a batch of responses, and how many calls failed."""

    scores: list[float]
    errors: int = 0
    """Calls that raised, returned a non-number or crashed their worker (scored 0)."""
    timeouts: int = 0
    """Calls that took longer than the timeout (scored 0)."""
    first_error: str | None = None
    """Message of the first failed call, for the log."""


class RewardScorer:
    """Scores responses with one reward function in a worker process, with a per-call timeout.

    Keep one for a run (the worker starts once, on first use); ``close`` or ``with`` ends it.
    """

    def __init__(self, reward_fn: RewardFn, timeout_s: float):
        try:
            pickle.dumps(reward_fn)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise InputError(
                f"reward function {reward_fn!r} must be importable by name (defined at module level): "
                f"it runs in a worker process ({err})") from None
        if not timeout_s > 0:
            raise ValueError(f"the reward timeout must be > 0 seconds, got {timeout_s}")
        self.reward_fn, self.timeout_s = reward_fn, timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._worker = None
        self._conn = None

    def score(self, responses: Sequence[str], answers: Sequence[str | None]) -> RewardScores:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        result = RewardScores(scores=[])
        for response, answer in zip(responses, answers):
            value, failure = self._call(response, answer)
            result.scores.append(value)
            if failure is not None:
                result.timeouts += failure == "timeout"
                result.errors += failure != "timeout"
                result.first_error = result.first_error or failure
        return result

    def _call(self, response: str, answer: str | None) -> tuple[float, str | None]:
        """(score, None) or (0.0, why it failed: "timeout" or an error message)."""
        self._ensure_worker()
        self._conn.send((response, answer))
        if not self._conn.poll(self.timeout_s):
            self._stop_worker(kill=True)
            return 0.0, "timeout"
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionError):
            self._stop_worker(kill=True)
            return 0.0, "the reward worker died"
        return (value, None) if status == "ok" else (0.0, value)

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self._stop_worker(kill=True)
        self._conn, child = self._context.Pipe()
        self._worker = self._context.Process(target=_serve, args=(child, self.reward_fn), daemon=True,
                                             name="reward-worker")
        self._worker.start()
        child.close()
        # Wait for the worker to have imported the function, so start-up never eats into a
        # call's timeout (a fresh interpreter can take seconds on a loaded machine).
        name = f"{self.reward_fn.__module__}.{self.reward_fn.__qualname__}"
        if not self._conn.poll(WORKER_START_TIMEOUT_S):
            self._stop_worker(kill=True)
            raise RuntimeError(f"the reward worker for {name} did not start within {WORKER_START_TIMEOUT_S} s")
        try:
            self._conn.recv()
        except (EOFError, ConnectionError):
            self._stop_worker(kill=True)
            raise RuntimeError(f"the reward worker for {name} exited while starting (its traceback is above)") from None

    def _stop_worker(self, kill: bool) -> None:
        if self._worker is None:
            return
        if kill or not self._worker.is_alive():
            self._worker.kill()
        else:
            self._conn.send(None)
        self._worker.join(timeout=10)
        self._conn.close()
        self._worker = self._conn = None

    def close(self) -> None:
        self._stop_worker(kill=False)

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_samples(reward_fn: RewardFn, responses: Sequence[str], answers: Sequence[str | None],
                  timeout_s: float) -> RewardScores:
    """Score a batch with a worker started for it alone (use a RewardScorer across steps)."""
    with RewardScorer(reward_fn, timeout_s) as scorer:
        return scorer.score(responses, answers)


def _serve(conn, reward_fn: RewardFn) -> None:
    """Worker loop: score each (response, answer) received until None arrives."""
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        try:
            value = reward_fn(*job)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            conn.send(("ok", float(value)) if ok else ("error", f"reward returned {value!r}, not a finite number"))
        except Exception as err:  # any failure of user code scores 0; the trainer goes on
            conn.send(("error", f"{type(err).__name__}: {err}"))
