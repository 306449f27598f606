"""Rank discovery from launcher environments: Slurm's compressed lists, srun tasks, torchrun,
precedence between launchers, and the errors for missing or contradicting variables.

The environments are the variables srun / torchrun / mpirun set for one process, passed as a
mapping; the real multi-process launches are in tests/e2e/test_launch_mpi.py.
"""

import pytest

from megatron_sapo.parallel.launch import (
    LaunchError,
    LaunchInfo,
    detect_launch,
    expand_nodelist,
    expand_tasks_per_node,
    slurm_master_port,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[001-003,007],cpu5", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("a-1,b[2],c-[3-4]", ["a-1", "b2", "c-3", "c-4"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("dgx[099-101].cluster", ["dgx099.cluster", "dgx100.cluster", "dgx101.cluster"]),
    ],
)
def test_nodelist_expansion(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    "text, problem",
    [
        ("gpu[1-3", "never closed"),
        ("gpu1-3]", "unbalanced"),
        ("gpu[[1-2]]", "nested"),
        ("gpu[3-1]", "backwards"),
        ("gpu[]", "not a number"),
        ("gpu[a-b]", "not a number"),
        ("gpu1,,gpu2", "empty host"),
        ("", "empty host"),
    ],
)
def test_bad_nodelists_name_the_variable(text, problem):
    with pytest.raises(LaunchError, match=rf"SLURM_JOB_NODELIST.*{problem}"):
        expand_nodelist(text, "SLURM_JOB_NODELIST")


@pytest.mark.parametrize(
    "text, counts",
    [("8", [8]), ("4(x2),3", [4, 4, 3]), ("2(x3)", [2, 2, 2]), ("1,2(x2),1", [1, 2, 2, 1])],
)
def test_tasks_per_node_expansion(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["4(x)", "x4", "4(2)", "0", "4(x0)", "4,,3", ""])
def test_bad_tasks_per_node(text):
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(text, "SLURM_TASKS_PER_NODE")


def srun_task(rank: int, ntasks: int, localid: int, nodeid: int, tasks_per_node: str, nodelist: str, **extra) -> dict:
    """The variables srun gives one task of job 123456, step 0."""
    env = {
        "SLURM_JOB_ID": "123456", "SLURM_JOBID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
    }
    env.update(extra)
    return env


def test_srun_two_nodes_of_four():
    env = srun_task(5, 8, localid=1, nodeid=1, tasks_per_node="4(x2)", nodelist="gpu[017-018]")
    assert detect_launch(env) == LaunchInfo("slurm", rank=5, world_size=8, local_rank=1, local_world_size=4,
                                            master_addr="gpu017", master_port=15000 + 123456 % 15000)


def test_srun_uneven_nodes_takes_this_nodes_count():
    env = srun_task(10, 11, localid=2, nodeid=2, tasks_per_node="4(x2),3", nodelist="gpu[001-002],cpu5")
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (10, 11, 2, 3)
    assert info.master_addr == "gpu001"


def test_srun_uniform_count_from_ntasks_per_node():
    env = srun_task(3, 4, localid=1, nodeid=1, tasks_per_node="", nodelist="a[1-2]", SLURM_NTASKS_PER_NODE="2")
    del env["SLURM_TASKS_PER_NODE"], env["SLURM_NODELIST"], env["SLURM_JOBID"]
    info = detect_launch(env)
    assert (info.local_world_size, info.master_addr) == (2, "a1")


def test_step_variables_come_before_the_jobs():
    # A 2-task step on the last two nodes of a 4-node job started with srun --preserve-env:
    # the job-level variables still describe the allocation.
    env = srun_task(1, 16, localid=0, nodeid=1, tasks_per_node="4(x4)", nodelist="gpu[001-004]",
                    SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="gpu[003-004]")
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_world_size, info.master_addr) == (1, 2, 1, "gpu003")


def test_master_address_and_port_from_the_environment_win():
    env = srun_task(0, 2, localid=0, nodeid=0, tasks_per_node="2", nodelist="gpu001",
                    MASTER_ADDR="10.0.0.7", MASTER_PORT="29123")
    info = detect_launch(env)
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 29123)


def test_job_ports_stay_below_the_ephemeral_range():
    ports = {slurm_master_port(job) for job in range(0, 10**6, 997)}
    assert min(ports) >= 15000 and max(ports) < 30000 < 32768
    assert slurm_master_port(4_242_001) != slurm_master_port(4_242_002)


TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "head", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}


def test_torchrun():
    assert detect_launch(TORCHRUN) == LaunchInfo("torchrun", 3, 8, 1, 2, "head", 29500)


def test_torchrun_started_by_srun_wins_over_slurm():
    # One srun task per node runs torchrun, which starts the workers: SLURM_PROCID is the node's.
    env = {**srun_task(1, 4, localid=0, nodeid=1, tasks_per_node="1(x4)", nodelist="gpu[1-4]"), **TORCHRUN}
    assert detect_launch(env).launcher == "torchrun"
    assert detect_launch(env).rank == 3


def test_srun_with_pmix_is_read_as_slurm_when_ranks_agree():
    env = srun_task(1, 2, localid=1, nodeid=0, tasks_per_node="2", nodelist="gpu1", PMIX_RANK="1")
    assert detect_launch(env).launcher == "slurm"


def test_mpi_and_slurm_disagreeing_is_an_error():
    # mpirun inside an allocation: its remote daemons were started by srun, so the ranks inherit
    # the daemons' SLURM_PROCID while the MPI variables hold the real rank.
    env = srun_task(0, 2, localid=0, nodeid=0, tasks_per_node="1(x2)", nodelist="gpu[1-2]",
                    OMPI_COMM_WORLD_RANK="5", OMPI_COMM_WORLD_SIZE="8", PMIX_RANK="5")
    with pytest.raises(LaunchError, match=r"SLURM_PROCID=0.*OMPI_COMM_WORLD_RANK=5.*MEGATRON_SAPO_LAUNCHER=mpi"):
        detect_launch(env)


def test_explicit_launcher_overrides_detection():
    env = {**srun_task(1, 2, localid=1, nodeid=0, tasks_per_node="2", nodelist="gpu1"), **TORCHRUN}
    assert detect_launch(env, launcher="slurm").rank == 1
    assert detect_launch({**env, "MEGATRON_SAPO_LAUNCHER": "slurm"}).rank == 1
    with pytest.raises(LaunchError, match="unknown launcher 'pbs'"):
        detect_launch(env, launcher="pbs")


def test_batch_script_without_srun_is_not_a_task():
    # sbatch runs the script as the batch step: SLURM_PROCID=0 but no step id.
    env = srun_task(0, 8, localid=0, nodeid=0, tasks_per_node="4(x2)", nodelist="gpu[1-2]")
    del env["SLURM_STEP_ID"], env["SLURM_STEPID"]
    with pytest.raises(LaunchError, match="not an srun task"):
        detect_launch(env)


def test_nothing_identifies_a_launcher():
    with pytest.raises(LaunchError, match="no launcher identified this process.*RANK/WORLD_SIZE"):
        detect_launch({"PATH": "/usr/bin"})


@pytest.mark.parametrize(
    "env, problem",
    [
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "MASTER_PORT is not set"),
        ({k: v for k, v in TORCHRUN.items() if k not in ("LOCAL_RANK", "MASTER_ADDR")},
         "LOCAL_RANK, MASTER_ADDR are not set"),
        ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside a world of 8"),
        ({**TORCHRUN, "RANK": "three"}, "RANK='three' is not an integer"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "local rank 2 of 2"),
        (srun_task(9, 8, localid=1, nodeid=1, tasks_per_node="4(x2)", nodelist="g[1-2]"), "rank 9 is outside"),
        (srun_task(1, 12, localid=1, nodeid=0, tasks_per_node="4(x2),3", nodelist="g[1-3]"),
         r"SLURM_TASKS_PER_NODE='4\(x2\),3' adds up to 11 tasks, but the world size is 12"),
        (srun_task(1, 11, localid=1, nodeid=3, tasks_per_node="4(x2),3", nodelist="g[1-3]"),
         "SLURM_NODEID=3 has no entry"),
        (srun_task(5, 11, localid=3, nodeid=2, tasks_per_node="4(x2),3", nodelist="g[1-3]"), "local rank 3 of 3"),
        (srun_task(0, 2, localid=0, nodeid=0, tasks_per_node="2", nodelist="g[1-"), "SLURM_JOB_NODELIST='g\\[1-'"),
    ],
)
def test_missing_or_contradicting_variables(env, problem):
    with pytest.raises(LaunchError, match=problem):
        detect_launch(env)


def test_slurm_without_node_list_or_job_id():
    env = srun_task(0, 2, localid=0, nodeid=0, tasks_per_node="2", nodelist="g1")
    del env["SLURM_JOB_NODELIST"], env["SLURM_NODELIST"]
    with pytest.raises(LaunchError, match="node list: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST"):
        detect_launch(env)
    env = srun_task(0, 2, localid=0, nodeid=0, tasks_per_node="2", nodelist="g1")
    del env["SLURM_JOB_ID"], env["SLURM_JOBID"]
    with pytest.raises(LaunchError, match="job id: none of SLURM_JOB_ID, SLURM_JOBID"):
        detect_launch(env)


def test_torch_env_holds_what_env_init_reads():
    info = LaunchInfo("slurm", 5, 8, 1, 4, "gpu017", 18456)
    assert info.torch_env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                "MASTER_ADDR": "gpu017", "MASTER_PORT": "18456"}


def test_gpu_choice_by_local_rank():
    from megatron_sapo.parallel.launch import _local_device

    info = LaunchInfo("slurm", 6, 8, 2, 4, "gpu001", 18456)
    assert _local_device(info, device_count=4) == 2
    assert _local_device(info, device_count=8) == 2
    assert _local_device(info, device_count=1) == 0  # srun --gpus-per-task=1: each task sees its own GPU
    with pytest.raises(LaunchError, match="4 processes on this host share 2 visible GPUs"):
        _local_device(info, device_count=2)
