"""Stopping a run on SIGTERM / SIGUSR1 or the STOP file: the handler, the ranks' agreement, and
signals passed on from the process that spawned the ranks (what `kill` of a `megatron-sapo train`
reaches)."""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_sapo.parallel.spawn import RankError, spawn
from megatron_sapo.training.stop import STOP_SIGNALS, Stopped, StopRequest

pytestmark = pytest.mark.unit


@pytest.fixture
def one_rank_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def test_first_signal_is_recorded_second_exits(one_rank_group, capsys):
    before = signal.getsignal(signal.SIGTERM)  # another test's server manager may hold it
    request = StopRequest().install()
    try:
        assert request.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.signum == signal.SIGUSR1
        stopped = request.agreed()
        assert stopped == Stopped(signal.SIGUSR1)
        assert (stopped.cause, stopped.exit_status) == ("SIGUSR1", 128 + signal.SIGUSR1)
        assert "received SIGUSR1: stopping after this step" in capsys.readouterr().err
        with pytest.raises(SystemExit) as stop_now:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop_now.value.code == 128 + signal.SIGTERM
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_file_is_honoured_once(one_rank_group, tmp_path):
    request = StopRequest(tmp_path / "STOP")
    assert request.agreed() is None
    (tmp_path / "STOP").touch()
    stopped = request.agreed()
    assert stopped == Stopped(None) and (stopped.cause, stopped.exit_status) == ("the STOP file", 0)
    assert not (tmp_path / "STOP").exists()  # consumed: a resumed run goes on
    assert request.agreed() is None


def wait_for_stop(folder: str) -> Stopped:
    """A rank: signal readiness, then wait until the ranks agree that a stop was asked for."""
    request = StopRequest().install()
    rank = dist.get_rank()
    Path(folder, f"ready-{rank}").touch()
    deadline = time.monotonic() + 120
    while (agreed := request.agreed()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no stop signal arrived")
        time.sleep(0.05)
    Path(folder, f"stopped-{rank}").write_text(str(agreed.signum))
    return agreed


def test_spawned_ranks_receive_and_agree_on_the_signal(tmp_path):
    def send_when_ready():
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_when_ready, daemon=True)
    sender.start()
    assert spawn(wait_for_stop, 2, str(tmp_path), forward_signals=STOP_SIGNALS) == Stopped(signal.SIGTERM)
    assert [(tmp_path / f"stopped-{r}").read_text() for r in range(2)] == [str(int(signal.SIGTERM))] * 2
    assert signal.getsignal(signal.SIGTERM) is before


def die_by_signal() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_rank_killed_by_a_signal_is_named():
    with pytest.raises(RankError, match=r"rank \d exited with status -9 \(SIGKILL\)"):
        spawn(die_by_signal, 2)
