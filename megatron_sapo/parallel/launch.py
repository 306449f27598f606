"""Rank discovery for multi-process launches: torchrun, SLURM (srun) and MPI, one code path.

``detect_launch()`` reads what the launcher told this process into a ``LaunchInfo``;
``init_distributed()`` exports it as the variables torch's ``env://`` rendezvous reads and
initialises the default process group (gloo without CUDA, NCCL with it, the GPU chosen by local
rank). ``python -m megatron_sapo.parallel.launch [--report-dir DIR]`` runs both plus an
all-reduce and prints what each rank saw (and writes it to ``DIR/rank-N.json``, since launchers
may merge the lines of several ranks): a check of a cluster launch before a long job.

Which launcher, in this order (the first that matches wins):

1. torchrun: ``RANK`` or ``WORLD_SIZE`` is set. torchrun writes these for each worker itself, so
   they describe this process even when torchrun was started by srun or mpirun (one agent per
   node); SLURM or MPI variables beside them describe the agent and are ignored.
2. SLURM: this process is a task of an srun step (``SLURM_PROCID`` and ``SLURM_STEP_ID``). A
   batch script's own environment carries ``SLURM_PROCID=0`` but no step id; a process started
   from it without srun is not one of N tasks and must not take itself for rank 0 of N. The
   step's variables (``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_TASKS_PER_NODE``,
   ``SLURM_STEP_NODELIST``) come before the job's because a step may use part of the
   allocation, and srun ``--preserve-env`` leaves the job's in place. The master is the first
   host of the node list, where task 0 runs; the list is expanded here from Slurm's compressed
   form (``gpu[001-003,007],cpu5``) since ``scontrol`` is often absent on compute nodes. The port
   is ``MASTER_PORT`` or derived from the job id, so every task finds the same one without
   talking to the others; it stays below 32768, out of Linux's range for ephemeral ports.
3. MPI: ``mpirun``/``mpiexec`` (``OMPI_COMM_WORLD_SIZE``, ``PMIX_RANK`` or ``PMI_RANK`` set).
   Rank and size come from mpi4py's ``COMM_WORLD``, the local rank from a shared-memory split
   (so any MPI works, not only Open MPI); rank 0 broadcasts its host name and a free port, or
   its own ``MASTER_ADDR``/``MASTER_PORT``, so other hosts need not share its environment.

Variables that disagree are an error, never a guess: an MPI rank variable that differs from
``SLURM_PROCID`` (mpirun inside an allocation, whose daemons srun started: the SLURM variables
then describe the daemons), or mpi4py seeing a world of 1 where the launcher says 2 (mpi4py
built against another MPI). ``MEGATRON_SAPO_LAUNCHER=torchrun|slurm|mpi`` (or ``launcher=``)
names the launcher explicitly and skips the detection.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

from megatron_sapo.parallel.ports import free_port

Launcher = Literal["torchrun", "slurm", "mpi"]
LAUNCHERS: tuple[str, ...] = ("torchrun", "slurm", "mpi")
LAUNCHER_ENV = "MEGATRON_SAPO_LAUNCHER"

# Slurm job ids map onto [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN): below 32768, where
# Linux starts handing out ephemeral ports, and above most well-known services.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000

# Variables in which an MPI launcher (Open MPI's mpirun, PMIx, PMI-1/2 as used by MPICH's Hydra
# and srun --mpi=pmi2) announces this process's rank and the world size.
MPI_RANK_VARS: tuple[str, ...] = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
MPI_SIZE_VARS: tuple[str, ...] = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class LaunchError(RuntimeError):
    """The launcher cannot be identified, or its variables are missing or contradict each other."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in a multi-process launch."""

    launcher: Launcher
    """Which launcher's variables these values were read from."""
    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the launch."""
    local_rank: int
    """Rank among the processes on this host; picks the GPU."""
    local_world_size: int
    """Number of processes on this host."""
    master_addr: str
    """Host of rank 0, where the rendezvous store listens."""
    master_port: int
    """Port of the rendezvous store."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.launcher}: rank {self.rank} is outside a world of {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise LaunchError(
                f"{self.launcher}: local rank {self.local_rank} of {self.local_world_size} processes on this host "
                f"does not fit a world of {self.world_size}")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{self.launcher}: master port {self.master_port} is not in 1..65535")
        if not self.master_addr:
            raise LaunchError(f"{self.launcher}: the master address is empty")

    def torch_env(self) -> dict[str, str]:
        """The variables torch's ``env://`` rendezvous (and code that reads LOCAL_RANK) expects."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


# ----------------------------------------------------------------------------------------------
# Slurm's compressed lists.
# ----------------------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_TASK_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def expand_nodelist(text: str, source: str = "node list") -> list[str]:
    """Host names of a Slurm node list such as ``gpu[001-003,007],cpu5``, in order.

    Zero padding follows the lower bound (``[08-11]`` gives 08 .. 11); several bracket groups in
    one name give every combination (``r[1-2]-n[1-2]``). ``source`` names the variable in errors.
    """
    hosts: list[str] = []
    for item in _split_outside_brackets(text, source):
        hosts.extend(_expand_host(item, source))
    return hosts


def _split_outside_brackets(text: str, source: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[]":
            depth += 1 if char == "[" else -1
            if depth not in (0, 1):
                raise LaunchError(f"{source}={text!r}: unbalanced or nested brackets")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"{source}={text!r}: a '[' is never closed")
    items.append(text[start:])
    if not all(item.strip() for item in items):
        raise LaunchError(f"{source}={text!r}: empty host name")
    return [item.strip() for item in items]


def _expand_host(item: str, source: str) -> list[str]:
    parts = [part for part in re.split(r"(\[[^\]]*\])", item) if part]
    choices = [_expand_ranges(part[1:-1], source, item) if part.startswith("[") else [part] for part in parts]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(body: str, source: str, item: str) -> list[str]:
    values: list[str] = []
    for part in body.split(","):
        low, dash, high = part.partition("-")
        if not _DIGITS.fullmatch(low) or (dash and not _DIGITS.fullmatch(high)):
            raise LaunchError(f"{source}: {item!r}: {part!r} is not a number or a range low-high")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise LaunchError(f"{source}: {item!r}: range {part!r} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_tasks_per_node(text: str, source: str = "tasks per node") -> list[int]:
    """Task counts per node of a Slurm list such as ``4(x2),3`` (two nodes of 4, then one of 3)."""
    counts: list[int] = []
    for part in text.split(","):
        match = _TASK_COUNT.fullmatch(part.strip())
        if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
            raise LaunchError(f"{source}={text!r}: {part!r} is not a count like 4 or 4(x2)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port every task of a Slurm job derives from the job id alone."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# ----------------------------------------------------------------------------------------------
# Detection.
# ----------------------------------------------------------------------------------------------


def detect_launch(env: Mapping[str, str] | None = None, launcher: str | None = None) -> LaunchInfo:
    """This process's place in the launch, from ``env`` (default: ``os.environ``).

    ``launcher`` (default: ``$MEGATRON_SAPO_LAUNCHER``) names the launcher instead of detecting
    it. The MPI launcher initialises MPI (through mpi4py) and communicates with the other ranks.
    """
    env = os.environ if env is None else env
    chosen = launcher or env.get(LAUNCHER_ENV) or _detect_launcher(env)
    if chosen not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {chosen!r} (from launcher= or ${LAUNCHER_ENV}); "
                          f"expected one of {', '.join(LAUNCHERS)}")
    if chosen == "torchrun":
        return _from_torchrun(env)
    if chosen == "slurm":
        return _from_slurm(env)
    return _from_mpi(env)


def _detect_launcher(env: Mapping[str, str]) -> Launcher:
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return "slurm"
    if any(name in env for name in MPI_RANK_VARS + MPI_SIZE_VARS):
        return "mpi"
    hint = ""
    if "SLURM_JOB_ID" in env or "SLURM_JOBID" in env:
        hint = (" This is a Slurm job but the process is not an srun task (no SLURM_STEP_ID): "
                "start it with srun, or with mpirun/torchrun inside the allocation.")
    raise LaunchError(
        "no launcher identified this process: none of torchrun's RANK/WORLD_SIZE, an srun task's "
        f"SLURM_PROCID with SLURM_STEP_ID, or an MPI launcher's {'/'.join(MPI_RANK_VARS)} is set.{hint} "
        f"Set ${LAUNCHER_ENV} to torchrun, slurm or mpi to choose one explicitly.")


def _int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise LaunchError(f"{name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _first_set(env: Mapping[str, str], names: tuple[str, ...], what: str) -> str:
    """The first of ``names`` that is set; the error lists them all."""
    for name in names:
        if name in env:
            return name
    raise LaunchError(f"{what}: none of {', '.join(names)} is set")


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [name for name in names if name not in env]
    if missing:
        raise LaunchError(f"torchrun-style launch (RANK/WORLD_SIZE set) but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set")
    return LaunchInfo("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
                      _int(env, "LOCAL_WORLD_SIZE"), env["MASTER_ADDR"], _int(env, "MASTER_PORT"))


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    rank = _int(env, "SLURM_PROCID")
    size_var = _first_set(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), "Slurm world size")
    world = _int(env, size_var)
    _check_mpi_agrees(env, rank, world, f"SLURM_PROCID={rank}, {size_var}={world}")
    local_world = _slurm_local_world_size(env, world)
    nodes_var = _first_set(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"), "Slurm node list")
    master_addr = env.get("MASTER_ADDR") or expand_nodelist(env[nodes_var], nodes_var)[0]
    if "MASTER_PORT" in env:
        master_port = _int(env, "MASTER_PORT")
    else:
        master_port = slurm_master_port(_int(env, _first_set(env, ("SLURM_JOB_ID", "SLURM_JOBID"), "Slurm job id")))
    return LaunchInfo("slurm", rank, world, _int(env, "SLURM_LOCALID"), local_world, master_addr, master_port)


def _slurm_local_world_size(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node: this node's entry of the per-node list, else the uniform count."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            counts = expand_tasks_per_node(env[name], name)
            if sum(counts) != world:
                raise LaunchError(
                    f"{name}={env[name]!r} adds up to {sum(counts)} tasks, but the world size is {world}")
            if len(counts) == 1:
                return counts[0]
            node = _int(env, "SLURM_NODEID")
            if not 0 <= node < len(counts):
                raise LaunchError(f"SLURM_NODEID={node} has no entry in {name}={env[name]!r} ({len(counts)} nodes)")
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    raise LaunchError("Slurm tasks per node: none of SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, "
                      "SLURM_NTASKS_PER_NODE is set")


def _check_mpi_agrees(env: Mapping[str, str], rank: int, world: int, ours: str) -> None:
    """An MPI launcher's rank/size variables, where present, must match ours."""
    for names, value in ((MPI_RANK_VARS, rank), (MPI_SIZE_VARS, world)):
        for name in names:
            if name in env and _int(env, name) != value:
                raise LaunchError(
                    f"{ours} but {name}={env[name]}: the Slurm and MPI variables describe different launches "
                    "(mpirun inside an allocation, whose daemons srun started?). Launch with srun alone, or set "
                    f"{LAUNCHER_ENV}=mpi to trust the MPI launcher")


def _from_mpi(env: Mapping[str, str]) -> LaunchInfo:
    from mpi4py import MPI  # initialises MPI; imported only when MPI launched this process

    world_comm = MPI.COMM_WORLD
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    node_comm = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    # Every rank takes part in every collective before any of them raises, so that a problem
    # seen on one rank becomes the same error on all of them instead of a hang on the others.
    problems = world_comm.allgather(_mpi_disagreement(env, rank, world, local_rank))
    master = None
    if rank == 0:
        master = (env.get("MASTER_ADDR") or socket.gethostname(), env.get("MASTER_PORT") or free_port(host=""))
    master_addr, master_port = world_comm.bcast(master, root=0)
    for where, problem in enumerate(problems):
        if problem:
            raise LaunchError(f"MPI rank {where}: {problem}")
    try:
        port = int(master_port)
    except ValueError:
        raise LaunchError(f"MASTER_PORT={master_port!r} on MPI rank 0 is not an integer") from None
    return LaunchInfo("mpi", rank, world, local_rank, local_world, master_addr, port)


def _mpi_disagreement(env: Mapping[str, str], rank: int, world: int, local_rank: int) -> str | None:
    """Where the launcher's variables contradict what MPI itself reports, say how; else None."""
    try:
        for names, value, what in ((MPI_RANK_VARS, rank, "rank"), (MPI_SIZE_VARS, world, "size")):
            for name in names:
                if name in env and _int(env, name) != value:
                    return (f"mpi4py reports {what} {value} (rank {rank} of {world}) but {name}={env[name]}: mpi4py "
                            "is probably built against a different MPI than the one that launched this process")
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env and _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") != local_rank:
            return (f"OMPI_COMM_WORLD_LOCAL_RANK={env['OMPI_COMM_WORLD_LOCAL_RANK']} but the shared-memory split "
                    f"of MPI_COMM_WORLD puts this process at local rank {local_rank}")
    except LaunchError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------------------------


def init_distributed(backend: str | None = None, launcher: str | None = None,
                     timeout: timedelta | None = None) -> LaunchInfo:
    """Detect the launch, export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT,
    select this rank's GPU (when CUDA is present) and initialise the default process group.

    ``backend``: None picks NCCL when CUDA is available, gloo otherwise.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise LaunchError("torch.distributed is already initialised in this process")
    info = detect_launch(launcher=launcher)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend nccl needs CUDA, which this process does not see; use gloo")
    os.environ.update(info.torch_env())
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_device(info, torch.cuda.device_count()))
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=timeout)
    return info


def _local_device(info: LaunchInfo, device_count: int) -> int:
    """GPU index of this rank: its local rank, or 0 when the launcher gave each task one GPU
    (e.g. srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task)."""
    if device_count >= info.local_world_size:
        return info.local_rank
    if device_count == 1:
        return 0
    raise LaunchError(f"{info.local_world_size} processes on this host share {device_count} visible GPUs; "
                      "give each process one GPU or all of them")


def _check_launch(report_dir: str | None) -> int:
    """Initialise, all-reduce (rank + 1, 1) and print one JSON line per rank (also written to
    ``report_dir/rank-N.json`` when given); 0 when the sums are right."""
    import torch
    import torch.distributed as dist

    info = init_distributed()
    nccl = dist.get_backend() == "nccl"
    total = torch.tensor([info.rank + 1.0, 1.0], device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(total)
    expected = [info.world_size * (info.world_size + 1) / 2, float(info.world_size)]
    report = {**asdict(info), "host": socket.gethostname(), "backend": dist.get_backend(),
              "all_reduce": total.tolist(), "expected": expected}
    print(json.dumps(report), flush=True)
    if report_dir is not None:
        os.makedirs(report_dir, exist_ok=True)
        with open(os.path.join(report_dir, f"rank-{info.rank}.json"), "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()
    return 0 if report["all_reduce"] == expected else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_sapo.parallel.launch",
                                     description="Check a multi-process launch: rendezvous and an all-reduce.")
    parser.add_argument("--report-dir", help="also write each rank's report to DIR/rank-N.json")
    args = parser.parse_args(argv)
    try:
        return _check_launch(args.report_dir)
    except LaunchError as err:
        print(f"launch check: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
