"""Real multi-process launches through `python -m megatron_sapo.parallel.launch`, which calls
init_distributed and all-reduces (rank + 1, 1) over gloo: under `mpirun -n 2`, and as two
processes given the variables srun gives the two tasks of a one-node step.

Each rank writes its report to its own file (mpirun may merge the ranks' stdout lines); both
must report their own rank, the same world, master and
port, and the sums 1 + 2 = 3 and 1 + 1 = 2.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from megatron_sapo.parallel.launch import SLURM_PORT_BASE, SLURM_PORT_SPAN
from megatron_sapo.parallel.ports import free_port

pytestmark = pytest.mark.slow

MPIRUN = shutil.which("mpirun")
CHECK = [sys.executable, "-m", "megatron_sapo.parallel.launch"]
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "MPI_LOCAL")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "MEGATRON_SAPO_LAUNCHER")


def clean_env() -> dict:
    """This environment minus anything a launcher set (the tests may themselves run under one)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES) and k not in LAUNCH_VARS
            and not k.startswith("TORCHELASTIC_")}


def reports(report_dir) -> list[dict]:
    found = [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank-*.json"))]
    return sorted(found, key=lambda r: r["rank"])


def check_two_ranks(found: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in found] == [0, 1]
    for r in found:
        assert (r["launcher"], r["world_size"], r["local_world_size"], r["backend"]) == (launcher, 2, 2, "gloo")
        assert r["local_rank"] == r["rank"]
        assert r["all_reduce"] == [3.0, 2.0] == r["expected"]
    assert found[0]["master_addr"] == found[1]["master_addr"]
    assert found[0]["master_port"] == found[1]["master_port"]


@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not on PATH (tools/setup_env.sh installs openmpi-bin)")
def test_mpirun_two_ranks(tmp_path):
    root = ["--allow-run-as-root"] if os.getuid() == 0 else []
    proc = subprocess.run([MPIRUN, "-n", "2", "--oversubscribe", *root, *CHECK, "--report-dir", str(tmp_path)],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = reports(tmp_path)
    check_two_ranks(found, "mpi")
    assert found[0]["master_addr"] == socket.gethostname()  # rank 0's host, broadcast to rank 1


@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not on PATH (tools/setup_env.sh installs openmpi-bin)")
def test_mpirun_port_set_on_rank_0_only_reaches_rank_1(tmp_path):
    # Two application contexts (MPMD): only rank 0's environment holds MASTER_PORT.
    port = free_port(host="")
    root = ["--allow-run-as-root"] if os.getuid() == 0 else []
    check = [*CHECK, "--report-dir", str(tmp_path)]
    command = [MPIRUN, "--oversubscribe", *root, "-n", "1", "-x", f"MASTER_PORT={port}", *check, ":", "-n", "1", *check]
    proc = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = reports(tmp_path)
    check_two_ranks(found, "mpi")
    assert found[1]["master_port"] == port


def free_port_in_slurm_range() -> int:
    return free_port(SLURM_PORT_BASE + 4242, SLURM_PORT_BASE + SLURM_PORT_SPAN)


def test_simulated_srun_step_of_two_tasks(tmp_path):
    # A job on four nodes whose step runs both tasks on the first one (this host, "localhost");
    # the rendezvous port is derived from the job id, chosen so that it is free here.
    port = free_port_in_slurm_range()
    job_id = 10 * SLURM_PORT_SPAN + port - SLURM_PORT_BASE
    base = {**clean_env(), "SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost,gpu[002-004]", "SLURM_STEP_NODELIST": "localhost"}
    check = [*CHECK, "--report-dir", str(tmp_path)]
    tasks = [subprocess.Popen(check, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (out, err) in zip(tasks, outputs):
        assert task.returncode == 0, out + err
    found = reports(tmp_path)
    check_two_ranks(found, "slurm")
    assert (found[0]["master_addr"], found[0]["master_port"]) == ("localhost", port)


def test_launch_check_without_a_launcher_fails_with_one_line():
    proc = subprocess.run(CHECK, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("launch check: error: no launcher identified this process")
