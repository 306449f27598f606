"""Rewards from an HTTP service (``data.reward_url``): a reward-model server or a remote verifier.

A step's responses are POSTed in batches of ``batch_size`` (up to ``workers`` requests at once,
``data.reward_workers``) as JSON::

    {"items": [{"response": "...", "answer": "..." or null, "fields": {...}}, ...]}

and the service answers ``{"scores": [...]}``, one entry per item: a number, or an object with
``"score"`` and extra numbers (logged as ``reward_<name>_mean``), as a reward function returns. An
entry that is not one of those scores 0 and is counted in ``reward_errors``. A request that fails
(connection refused, timeout after ``data.reward_timeout_s``, an HTTP error, an answer that is not
that JSON or holds another number of scores) is sent again after a backoff, up to
``data.reward_retries`` times; after that the step fails with :class:`RewardServiceError`, naming
the URL and every failure, and the run keeps its last checkpoint.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests

from megatron_sapo.data.rewards import RewardScores, check_reward_value

BATCH_SIZE = 64


def _json_safe(value):
    """A row's fields as JSON can carry them: NaN and infinities become null, other types
    (bytes, dates) their text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


class RewardServiceError(RuntimeError):
    """The reward service did not answer usefully after every retry."""


class RemoteRewardScorer:
    def __init__(self, url: str, timeout_s: float, *, workers: int = 1, retries: int = 3, backoff_s: float = 1.0,
                 batch_size: int = BATCH_SIZE) -> None:
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.batch_size = batch_size
        self.name = url
        self.retried = 0
        """Requests sent again since the scorer was made."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-http")
        self._session = requests.Session()

    def score(self, responses: Sequence[str], answers: Sequence[str | None],
              fields: Sequence[dict] | None = None) -> RewardScores:
        if len(responses) != len(answers) or (fields is not None and len(fields) != len(responses)):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        items = [{"response": r, "answer": a, "fields": {} if fields is None else _json_safe(fields[i])}
                 for i, (r, a) in enumerate(zip(responses, answers))]
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        result = RewardScores(scores=[])
        for batch, entries in zip(batches, self._pool.map(self._post, batches)):
            for entry in entries:
                status, value, extras = check_reward_value(entry)
                if status == "ok":
                    result.scores.append(value)
                    for key, number in extras.items():
                        result.extras.setdefault(key, []).append(number)
                else:
                    result.scores.append(0.0)
                    result.errors += 1
                    result.first_error = result.first_error or f"{self.url} scored an item: {value}"
        return result

    def _post(self, batch: list[dict]) -> list:
        failures = []
        for attempt in range(self.retries + 1):
            try:
                response = self._session.post(self.url, json={"items": batch}, timeout=self.timeout_s)
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
                scores = response.json().get("scores")
                if not isinstance(scores, list) or len(scores) != len(batch):
                    raise ValueError(f"expected {{\"scores\": [{len(batch)} entries]}}, got {response.text[:200]}")
                return scores
            except (requests.RequestException, ValueError, AttributeError) as err:
                failures.append(f"{type(err).__name__}: {err}")
            if attempt < self.retries:
                self.retried += 1
                time.sleep(self.backoff_s * 2 ** attempt)
        raise RewardServiceError(f"the reward service {self.url} failed {len(failures)} times: " + "; ".join(failures))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
