"""Rewards from a real HTTP server on this machine (``data.reward_url``): batches, extras, an
entry that is not a score, retries after failures, a service that stays down, and one that
accepts the request but answers too late."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_sapo.data.remote_reward import RemoteRewardScorer, RewardServiceError
from megatron_sapo.parallel.ports import free_port


class RewardService(BaseHTTPRequestHandler):
    """Scores 1 when the response equals the answer, with its length as an extra; answers
    ``fail_first`` requests with HTTP 503 first; "junk" gets an entry that is not a score."""

    fail_first = 0
    requests: list[int] = []

    def do_POST(self):
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"]
        type(self).requests.append(len(items))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        scores = ["not a score" if item["response"] == "junk" else
                  {"score": float(item["response"] == item["answer"]), "length": len(item["response"]),
                   "level": item["fields"].get("level", 0)}
                  for item in items]
        body = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def service():
    RewardService.fail_first, RewardService.requests = 0, []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), RewardService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_batches_are_scored_with_their_extras_and_fields(service):
    scorer = RemoteRewardScorer(service, timeout_s=10, workers=2, batch_size=3)
    responses = ["a", "bb", "junk", "d", "e", "ff", "g"]
    answers = ["a", "x", "junk", "d", "x", "ff", None]
    result = scorer.score(responses, answers, [{"level": i} for i in range(7)])
    scorer.close()
    assert sorted(RewardService.requests) == [1, 3, 3]  # two workers: arrival order varies
    assert result.scores == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert result.errors == 1 and "not a finite number" in result.first_error and service in result.first_error
    assert result.extras["length"] == [1.0, 2.0, 1.0, 1.0, 2.0, 1.0]
    assert result.extra_means()["reward_level_mean"] == pytest.approx((0 + 1 + 3 + 4 + 5 + 6) / 6)


def test_failed_requests_are_sent_again(service):
    RewardService.fail_first = 2
    scorer = RemoteRewardScorer(service, timeout_s=10, retries=3, backoff_s=0.05)
    assert scorer.score(["a"], ["a"]).scores == [1.0]
    assert scorer.retried == 2 and RewardService.requests == [1, 1, 1]


def test_a_service_that_stays_down_stops_the_step_naming_it():
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    scorer = RemoteRewardScorer(url, timeout_s=2, retries=2, backoff_s=0.05)
    with pytest.raises(RewardServiceError, match=f"the reward service {url} failed 3 times: ConnectionError"):
        scorer.score(["a"], ["a"])


def test_a_service_that_answers_too_late_times_out_each_try_then_stops_the_step(service):
    original, arrived = RewardService.do_POST, []

    def late(self):
        arrived.append(time.perf_counter())
        time.sleep(1.5)
        original(self)

    RewardService.do_POST = late
    try:
        scorer = RemoteRewardScorer(service, timeout_s=0.3, retries=1, backoff_s=0.05)
        start = time.perf_counter()
        with pytest.raises(RewardServiceError, match=f"the reward service {service} failed 2 times: .*[Tt]imeout"):
            scorer.score(["a"], ["a"])
        assert time.perf_counter() - start < 1.5  # each try gave up after its 0.3 s, not the reply's 1.5
        assert len(arrived) == 2  # the first try and one retry
    finally:
        RewardService.do_POST = original


@contextmanager
def one_score_replies(seen: list):
    """The service answers every request with one score (1.0), whatever it was sent; ``seen``
    gets the items of each request."""
    original = RewardService.do_POST

    def reply(self):
        seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"])
        body = b'{"scores": [1.0]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    RewardService.do_POST = reply
    try:
        yield
    finally:
        RewardService.do_POST = original


def test_a_service_answering_the_wrong_number_of_scores_is_a_failure(service):
    scorer = RemoteRewardScorer(service, timeout_s=10, retries=0)
    with one_score_replies([]), pytest.raises(RewardServiceError, match=r"expected \{\"scores\": \[2 entries\]\}"):
        scorer.score(["a", "b"], ["a", "b"])


def test_fields_that_json_cannot_carry_travel_as_null_or_text(service):
    seen = []
    scorer = RemoteRewardScorer(service, timeout_s=10, retries=0)
    fields = {"difficulty": float("nan"), "raw": b"\x00\x01", "tags": ("a", float("inf")), 3: {"ok": 1}}
    with one_score_replies(seen):
        assert scorer.score(["a"], ["a"], [fields]).scores == [1.0]
    assert [items[0]["fields"] for items in seen] == [
        {"difficulty": None, "raw": "b'\\x00\\x01'", "tags": ["a", None], "3": {"ok": 1}}]
