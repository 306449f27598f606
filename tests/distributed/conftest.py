"""Multi-rank tests: every rank runs this same pytest session under one torchrun launch.

    torchrun --nproc_per_node=2 -m pytest -m distributed tests/distributed

One gloo process group serves the whole session (a launch costs seconds). Rank 0 reports;
other ranks stay silent and write their failures to a log file. After each test the ranks
agree on its outcome, so a failure on any rank fails the test on rank 0. Run outside torchrun, the tests
are skipped with the command to use.
"""

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

UNDER_TORCHRUN = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
RANK = int(os.environ.get("RANK", "0"))
RANK_LOG = os.path.join(tempfile.gettempdir(), f"megatron-sapo-tests-rank{RANK}.log")
COLLECTIVE_TIMEOUT_S = int(os.environ.get("MEGATRON_SAPO_TEST_COLLECTIVE_TIMEOUT_S", "180"))
"""How long a rank waits in a collective for its peers (gloo's default is 30 minutes): a rank
that diverged (an exception between collectives) makes the others fail after this, not hang the
launch until its 50-minute kill. The longest legitimate wait is one rank saving or converting a
model while the others wait at a barrier, well under a minute here."""


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not UNDER_TORCHRUN:
        return
    if RANK != 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
        xml = getattr(config, "_xml", None)  # --junitxml: rank 0 writes the report
        if xml is not None:
            config.pluginmanager.unregister(xml)
            del config._xml
        open(RANK_LOG, "w").close()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def pytest_unconfigure(config):
    if UNDER_TORCHRUN and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.path.is_relative_to(HERE):
            continue
        item.add_marker(pytest.mark.distributed)
        if not UNDER_TORCHRUN:
            item.add_marker(pytest.mark.skip(
                reason="multi-rank test: run `torchrun --nproc_per_node=2 -m pytest -m distributed tests/distributed` "
                "(tools/run_tests.sh does)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not UNDER_TORCHRUN:
        return
    # Every phase (fixtures' setup and teardown too): a rank whose setup failed skips the test,
    # and its peers must skip it as well rather than wait for it in the test's first collective.
    if report.failed and RANK != 0:
        with open(RANK_LOG, "a") as log:
            log.write(f"FAILED {item.nodeid} ({report.when}) on rank {RANK}\n{report.longreprtext}\n\n")
    failed = torch.tensor([int(report.failed)])
    dist.all_reduce(failed)
    if failed.item() and not report.failed:
        report.outcome = "failed"
        report.longrepr = f"{report.when} failed on another rank; see {RANK_LOG.replace('rank0', 'rank<N>')}"


@pytest.fixture
def world():
    """The default (world) group of the launch, passed explicitly to what needs a group."""
    return dist.group.WORLD


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """The tiny random Qwen3-MoE (models/tiny.py, seed 0, fp32) saved once for the session."""
    from megatron_sapo.models.tiny import save_tiny_qwen3_moe
    from rank_files import shared_dir

    path = shared_dir(tmp_path_factory, "tiny_qwen3_moe") / "hf"
    if dist.get_rank() == 0:
        save_tiny_qwen3_moe(path, seed=0)
    dist.barrier()
    return path


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory):
    """The tiny random Qwen3-VL-MoE (models/tiny_vl.py, seed 0, fp32, with its processor) saved
    once for the session."""
    from megatron_sapo.models.tiny_vl import save_tiny_qwen3_vl_moe
    from rank_files import shared_dir

    path = shared_dir(tmp_path_factory, "tiny_qwen3_vl_moe") / "hf"
    if dist.get_rank() == 0:
        save_tiny_qwen3_vl_moe(path, seed=0)
    dist.barrier()
    return path
