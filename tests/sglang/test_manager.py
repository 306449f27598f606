"""The server manager against real SGLang servers on CPU: a server killed in the middle of a
rollout is restarted and the rollout still returns every sample; a trainer that is killed
(SIGKILL) or stopped (SIGTERM) leaves no process of its servers behind.

The orphan tests start their own server in a child process (the "trainer"); to keep one server
on the machine at a time, the session server is stopped while they run and started again after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from megatron_sapo.rollout.client import RolloutClient, SamplingParams
from megatron_sapo.types import Prompt
from megatron_sapo.parallel.ports import free_port
from sglang_reference import hf_greedy

pytestmark = pytest.mark.sglang

GROUPS, GROUP_SIZE, MAX_NEW_TOKENS = 8, 4, 128
ORPHAN_DEADLINE_S = 30.0


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_until_decoding(url: str, rollout: threading.Thread, deadline_s: float = 300.0) -> None:
    """Return once the server is running requests of ``rollout`` (SGLang's ``/v1/loads``)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert rollout.is_alive(), "the rollout finished before the server could be killed; make it longer"
        loads = requests.get(f"{url}/v1/loads", params={"include": "core"}, timeout=30).json()["loads"]
        if loads[0]["num_running_reqs"] > 0:
            return
        time.sleep(0.1)
    pytest.fail(f"the server ran no request within {deadline_s:.0f} s of the rollout's start")


def wait_for_no_survivors(pgid: int, deadline_s: float) -> tuple[list[int], float]:
    """The processes of ``pgid`` still alive after at most ``deadline_s``, and the seconds waited."""
    start = time.monotonic()
    while (alive := process_group(pgid)) and time.monotonic() - start < deadline_s:
        time.sleep(0.2)
    return alive, time.monotonic() - start


# ---- a server killed during a rollout -----------------------------------------------------------

def test_server_killed_mid_rollout_is_restarted_and_groups_are_complete(manager, tiny_models):
    url = manager.urls[0]
    old_pid = manager.pids()[0]
    client = RolloutClient(manager.urls, on_failure=manager.ensure_alive, backoff_s=0.5)
    prompts = [Prompt(index=i, prompt_ids=[5 + i, 17, 33, 100, 7]) for i in range(GROUPS)]
    outcome: dict = {}

    def rollout():
        try:
            outcome["groups"] = client.generate_groups(prompts, GROUP_SIZE, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        except BaseException as err:  # reported by the test thread
            outcome["error"] = err

    thread = threading.Thread(target=rollout, daemon=True)  # a failed test must not keep it using the server
    thread.start()
    wait_until_decoding(url, thread)
    os.killpg(old_pid, signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive(), "the rollout did not finish after the restart"
    assert "error" not in outcome, f"the rollout failed: {outcome.get('error')!r}"

    groups = outcome["groups"]
    assert client.retries > 0, "no request was retried: the kill did not hit the rollout"
    assert [g.prompt.index for g in groups] == list(range(GROUPS))
    for group in groups:
        assert len(group.samples) == GROUP_SIZE
        for sample in group.samples:
            assert sample.prompt_ids == group.prompt.prompt_ids
            assert 1 <= len(sample.response_ids) <= MAX_NEW_TOKENS
            assert len(sample.rollout_logprobs) == len(sample.response_ids)
            if sample.finish_reason == "length":
                assert len(sample.response_ids) == MAX_NEW_TOKENS
            else:
                assert sample.finish_reason == "stop"
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    print(f"\n{len(lengths)} samples after a kill mid-rollout, {client.retries} requests retried; "
          f"response lengths {min(lengths)}-{max(lengths)}")

    # The new server was started for the rollout's thread, which has ended: it must outlive it,
    # serve the same model, and the killed server's process group must be gone.
    time.sleep(1.0)
    assert manager.pids()[0] != old_pid and manager.alive(url)
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert wait_for_no_survivors(old_pid, ORPHAN_DEADLINE_S)[0] == []
    prompt = [5, 17, 33, 100, 7]
    out = requests.post(f"{url}/generate", json={"input_ids": prompt, "sampling_params": {
        "temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}}, timeout=120).json()
    assert out["output_ids"] == hf_greedy(str(tiny_models[0]), prompt, 6)


# ---- no orphans when the trainer is killed or stopped -------------------------------------------

TRAINER = """
import json, os, sys, time
from megatron_sapo.rollout.manager import ServerManager
from megatron_sapo.rollout.server import ServerOptions

model, port, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
opts = ServerOptions(model=model, port=port, dtype="float32", extra_args=["--skip-tokenizer-init"])
manager = ServerManager([opts], work, startup_timeout_s=600).start()
with open(os.path.join(work, "pids.tmp"), "w") as f:
    json.dump(manager.pids(), f)
os.rename(os.path.join(work, "pids.tmp"), os.path.join(work, "pids.json"))
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def session_server_stopped(manager):
    manager.stop()
    yield
    manager.start()


def start_trainer(model: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """The trainer process and its server's pid (= its process group), once the server is healthy."""
    with open(work / "trainer.err", "w") as err:
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(model), str(free_port()), str(work)],
                                   stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 600
    while not (work / "pids.json").exists():
        if trainer.poll() is not None or time.monotonic() > deadline:
            trainer.kill()
            pytest.fail(f"the trainer did not bring its server up:\n{(work / 'trainer.err').read_text()[-3000:]}")
        time.sleep(0.5)
    (server_pid,) = json.loads((work / "pids.json").read_text())
    return trainer, server_pid


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_no_server_process_survives_the_trainer(session_server_stopped, tiny_models, tmp_path, sig, exit_code):
    trainer, server_pid = start_trainer(tiny_models[0], tmp_path)
    try:
        members = process_group(server_pid)
        # The server and the scheduler and detokenizer processes it spawned.
        assert server_pid in members and len(members) >= 3, members
        trainer.send_signal(sig)
        assert trainer.wait(60) == exit_code
        survivors, seconds = wait_for_no_survivors(server_pid, ORPHAN_DEADLINE_S)
        assert survivors == [], f"{signal.Signals(sig).name}: server processes {survivors} outlived the trainer"
        print(f"\n{signal.Signals(sig).name}: all {len(members)} server processes gone {seconds:.1f} s after "
              "the trainer exited")
    finally:
        trainer.kill()
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
