"""Reward functions, and scoring a batch of responses in worker processes without letting one
call hang a step.

A reward is named in ``data.reward`` by one of:

* a built-in name: "math" (``math_answers``), "exact_match" (the synthetic task's verifier), or
  one added with ``@register_reward("name")`` before the config is loaded;
* ``"path/to/file.py:function"``: a function in a Python file (a relative path is read from the
  directory the command runs in);
* ``"package.module:function"``: a function in an importable module.

The function takes ``(response, answer, fields)``: the response text, the row's reference answer
(None without one) and the row's other fields (a dict; empty for the synthetic tasks);
``(response, answer)`` is accepted too. It returns a float, or a dict with a float ``"score"``
and any other numbers, each logged as ``reward_<name>_mean``. A missing file, module or function,
something not callable or a signature that cannot take those arguments is an error when the
config is loaded, naming the file and the function.

Scoring runs in ``workers`` processes (``data.reward_workers``), each one call at a time, because
a thread cannot be stopped: a call that outlives its timeout has its worker killed and replaced.
Workers are started with "spawn" (a fork of a trainer holding communicator threads is unsafe)
and load the function themselves from its name. A call that raises, returns something that is
not a finite number, kills its worker or times out scores 0 and is counted; the first failure's
traceback goes back with the counts, for the run's log.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import pickle
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable, Sequence

from megatron_sapo.data.math_answers import math_reward
from megatron_sapo.errors import InputError

RewardFn = Callable[..., "float | dict"]

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
    """The reward ``name`` refers to: a registered name, ``file.py:function`` or
    ``module:function`` (see the module docstring); InputError naming what is wrong."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise InputError(f"unknown reward {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
                         "(or give path/to/file.py:function or package.module:function)")
    where, _, function = name.rpartition(":")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise InputError(f"reward {name!r}: no such file {path}")
        module_name = "megatron_sapo_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                raise InputError(f"reward {name!r}: {path} fails to load: {type(err).__name__}: {err}") from None
            sys.modules[module_name] = module
        source = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise InputError(f"reward {name!r}: cannot import module {where!r}: {type(err).__name__}: {err}") from None
        source = f"module {where}"
    fn = getattr(module, function, None)
    if fn is None:
        raise InputError(f"reward {name!r}: {source} has no function {function!r}")
    if not callable(fn):
        raise InputError(f"reward {name!r}: {source}: {function} is a {type(fn).__name__}, not a function")
    _arity(fn, name)
    return fn


def _arity(fn: RewardFn, name: str) -> int:
    """How many of (response, answer, fields) ``fn`` takes: 3 or 2."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return 3
    for count in (3, 2):
        try:
            signature.bind(*range(count))
            return count
        except TypeError:
            continue
    raise InputError(f"reward {name!r}: {getattr(fn, '__qualname__', fn)}{signature} cannot be called as "
                     "(response, answer, fields) or (response, answer)")


@dataclass
class RewardScores:
    """Scores of a batch of responses, the extra numbers a reward returned, and how many calls
    failed."""

    scores: list[float]
    extras: dict[str, list[float]] = field(default_factory=dict)
    """Per extra name, its values over the calls that returned it."""
    errors: int = 0
    """Calls that raised, returned a non-number or crashed their worker (scored 0)."""
    timeouts: int = 0
    """Calls that took longer than the timeout (scored 0)."""
    first_error: str | None = None
    """The first failed call's traceback (or what went wrong), for the log."""

    def extra_means(self) -> dict[str, float]:
        return {f"reward_{key}_mean": sum(values) / len(values) for key, values in self.extras.items() if values}

    @staticmethod
    def merged(parts: list["RewardScores"]) -> "RewardScores":
        """One batch's scores after another's (dynamic sampling's rounds)."""
        total = RewardScores(scores=[])
        for part in parts:
            total.scores += part.scores
            for key, values in part.extras.items():
                total.extras.setdefault(key, []).extend(values)
            total.errors += part.errors
            total.timeouts += part.timeouts
            total.first_error = total.first_error or part.first_error
        return total


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    job: int | None = None
    deadline: float = 0.0


class RewardScorer:
    """Scores responses with one reward function in ``workers`` processes, with a per-call
    timeout. ``reward`` is a name :func:`get_reward` accepts, or a function importable by name.

    Keep one for a run (workers start on first use and stay); ``close`` or ``with`` ends them.
    """

    def __init__(self, reward: str | RewardFn, timeout_s: float, workers: int = 1):
        if isinstance(reward, str):
            fn = get_reward(reward)  # errors now, naming the file and the function
            if ":" not in reward:  # a registered function: the worker imports it by name
                reward = fn
        if not isinstance(reward, str):
            try:
                pickle.dumps(reward)
            except (pickle.PicklingError, AttributeError, TypeError) as err:
                raise InputError(
                    f"reward function {reward!r} must be importable by name (defined at module level): "
                    f"it runs in a worker process ({err})") from None
        if not timeout_s > 0:
            raise ValueError(f"the reward timeout must be > 0 seconds, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"reward workers must be >= 1, got {workers}")
        self.reward, self.timeout_s, self.workers = reward, timeout_s, workers
        self._context = multiprocessing.get_context("spawn")
        self._pool: list[_Worker | None] = [None] * workers

    @property
    def name(self) -> str:
        if isinstance(self.reward, str):
            return self.reward
        return f"{self.reward.__module__}.{self.reward.__qualname__}"

    def score(self, responses: Sequence[str], answers: Sequence[str | None],
              fields: Sequence[dict] | None = None) -> RewardScores:
        """Score ``responses[i]`` against ``answers[i]`` and the row's ``fields[i]``, up to
        ``workers`` calls at once."""
        if len(responses) != len(answers) or (fields is not None and len(fields) != len(responses)):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers"
                             + ("" if fields is None else f" and {len(fields)} field dicts"))
        jobs = [(r, a, {} if fields is None else dict(fields[i])) for i, (r, a) in enumerate(zip(responses, answers))]
        result = RewardScores(scores=[0.0] * len(jobs))
        failures: list[tuple[int, str]] = []
        waiting = list(range(len(jobs)))[::-1]
        while waiting or any(w is not None and w.job is not None for w in self._pool):
            for slot in range(self.workers):
                if waiting and (self._pool[slot] is None or self._pool[slot].job is None):
                    worker = self._ensure_worker(slot)
                    worker.job = waiting.pop()
                    worker.conn.send(jobs[worker.job])
                    worker.deadline = time.monotonic() + self.timeout_s
            busy = [w for w in self._pool if w is not None and w.job is not None]
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in busy:
                slot = self._pool.index(worker)
                if worker.conn in ready:
                    try:
                        status, value, extras = worker.conn.recv()
                    except (EOFError, ConnectionError):
                        failures.append((worker.job, "the reward worker died"))
                        result.errors += 1
                        self._stop(slot, kill=True)
                        continue
                    if status == "ok":
                        result.scores[worker.job] = value
                        for key, number in extras.items():
                            result.extras.setdefault(key, []).append(number)
                    else:
                        failures.append((worker.job, value))
                        result.errors += 1
                    worker.job = None
                elif time.monotonic() >= worker.deadline:
                    failures.append((worker.job, f"timeout: the call took longer than {self.timeout_s} s"))
                    result.timeouts += 1
                    self._stop(slot, kill=True)
        if failures:
            result.first_error = min(failures)[1]
        return result

    def _ensure_worker(self, slot: int) -> _Worker:
        worker = self._pool[slot]
        if worker is not None and worker.process.is_alive():
            return worker
        self._stop(slot, kill=True)
        conn, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.reward), daemon=True,
                                        name=f"reward-worker-{slot}")
        process.start()
        child.close()
        # Wait for the worker to have loaded the function, so start-up never eats into a call's
        # timeout (a fresh interpreter can take seconds on a loaded machine).
        if not conn.poll(WORKER_START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"the reward worker for {self.name} did not start within {WORKER_START_TIMEOUT_S} s")
        try:
            conn.recv()
        except (EOFError, ConnectionError):
            process.kill()
            raise RuntimeError(f"the reward worker for {self.name} exited while starting (its traceback is "
                               "above)") from None
        self._pool[slot] = _Worker(process=process, conn=conn)
        return self._pool[slot]

    def _stop(self, slot: int, kill: bool) -> None:
        worker = self._pool[slot]
        if worker is None:
            return
        if kill or not worker.process.is_alive():
            worker.process.kill()
        else:
            worker.conn.send(None)
        worker.process.join(timeout=10)
        worker.conn.close()
        self._pool[slot] = None

    def close(self) -> None:
        for slot in range(self.workers):
            self._stop(slot, kill=False)

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_samples(reward: str | RewardFn, responses: Sequence[str], answers: Sequence[str | None],
                  timeout_s: float, fields: Sequence[dict] | None = None) -> RewardScores:
    """Score a batch with a worker started for it alone (use a RewardScorer across steps)."""
    with RewardScorer(reward, timeout_s) as scorer:
        return scorer.score(responses, answers, fields)


def _serve(conn, reward: str | RewardFn) -> None:
    """Worker loop: score each (response, answer, fields) received until None arrives."""
    fn = get_reward(reward) if isinstance(reward, str) else reward
    takes_fields = _arity(fn, getattr(fn, "__qualname__", str(fn))) == 3
    conn.send(("ready", None, None))
    while (job := conn.recv()) is not None:
        response, answer, fields = job
        try:
            value = fn(response, answer, fields) if takes_fields else fn(response, answer)
            conn.send(check_reward_value(value))
        except Exception as err:  # any failure of user code scores 0; the trainer goes on
            frames = err.__traceback__.tb_next  # from the reward function down, not this loop
            conn.send(("error", "".join(traceback.format_exception(type(err), err, frames)).rstrip(), None))


def check_reward_value(value) -> tuple[str, object, dict | None]:
    """("ok", score, extras) or ("error", why, None) for what a reward function returned."""
    extras: dict[str, float] = {}
    if isinstance(value, dict):
        if "score" not in value:
            return "error", f"reward returned a dict without 'score': {sorted(value)}", None
        extras = {k: v for k, v in value.items() if k != "score"}
        bad = {k: v for k, v in extras.items() if not _finite(v)}
        if bad:
            return "error", f"reward returned extras that are not finite numbers: {bad!r}", None
        value = value["score"]
    if not _finite(value):
        return "error", f"reward returned {value!r}, not a finite number", None
    return "ok", float(value), {k: float(v) for k, v in extras.items()}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)  # a bool counts as 0 or 1
