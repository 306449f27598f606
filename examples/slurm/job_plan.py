"""The layout of one SLURM job, worked out from its run config: the helper of launch_rl.sh.

``launch_rl.sh`` runs ``python job_plan.py CONFIG [--set ...]`` inside the allocation and
``eval``s what it prints: shell assignments saying which nodes train and which serve rollouts,
how many ranks and CPUs each training node gets, how many SGLang servers each rollout node
starts (GPUs per node / ``rollout.server_tp``) and their addresses, the model layout the
checkpoint conversion is checked against, the HF checkpoint to convert and serve, and whether
servers must return routed experts (R3).

Choices and why:

- Everything is derived from the config, with the same ``--set`` overrides the trainer gets, so
  nothing the config says (server TP, parallel sizes, rollout mode) is typed twice; the sizes are
  checked here, before any node starts, with the config's own error messages (a world size TP
  does not divide, a minibatch DP does not split).
- One allocation is split by position: the last ``--rollout-nodes`` hosts of the node list
  serve, the others train. The batch script itself runs on the first host, a training node.
- Without GPUs (the CPU demo) each training node runs the ranks one copy of the model needs
  (``world_size_for``), and a rollout node runs one server.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

from megatron_sapo.config import SERVED_DTYPES, ConfigError, RunConfig
from megatron_sapo.config_file import load_config
from megatron_sapo.parallel.launch import LaunchError, expand_nodelist


@dataclass(frozen=True)
class JobPlan:
    """Where each part of the run goes in the allocation."""

    mode: str
    """rollout.mode: "colocated" (the trainer starts its servers) or "disaggregated"."""
    train_hosts: list[str]
    """Hosts running the training ranks; the first one runs the conversion step."""
    rollout_hosts: list[str]
    """Hosts running SGLang servers (empty when colocated)."""
    tasks_per_node: int
    """Training ranks per training host (one per GPU, or one model copy's ranks on CPU)."""
    cpus_per_task: int
    """CPUs each training rank is given."""
    data_parallel: int
    """Data-parallel size of the training ranks."""
    server_tp: int
    """Tensor-parallel size of each SGLang server (rollout.server_tp)."""
    servers_per_node: int
    """SGLang servers per rollout host."""
    server_port: int
    """Port of a rollout host's first server; the others follow it."""
    return_routed_experts: bool
    """Servers must return the experts they routed to (train.routing_replay = "r3")."""
    server_dtype: str
    """The dtype servers load the weights in: the trained one (model.params_dtype), as the
    trainer's own colocated servers do, so train and rollout log-probs agree."""
    tp: int
    pp: int
    ep: int
    """The model layout (parallel.tp / pp / ep) the conversion step checks the model against."""
    hf_dir: str | None
    """The HF checkpoint the run starts from and the servers load (None: a built-in model)."""

    @property
    def servers(self) -> list[str]:
        """Addresses ("host:port") of every server, host by host."""
        return [f"{host}:{self.server_port + i}"
                for host in self.rollout_hosts for i in range(self.servers_per_node)]

    def shell(self) -> str:
        """Bash assignments of the plan, for ``eval``."""
        values = {
            "ROLLOUT_MODE": self.mode,
            "TRAIN_HOSTS": " ".join(self.train_hosts),
            "TRAIN_NODELIST": ",".join(self.train_hosts),
            "TRAIN_NODES": len(self.train_hosts),
            "TASKS_PER_NODE": self.tasks_per_node,
            "CPUS_PER_TASK": self.cpus_per_task,
            "DATA_PARALLEL": self.data_parallel,
            "ROLLOUT_HOSTS": " ".join(self.rollout_hosts),
            "SERVER_TP": self.server_tp,
            "SERVERS_PER_NODE": self.servers_per_node,
            "SERVER_ADDRESSES": " ".join(self.servers),
            "SERVERS_TOML": "[" + ", ".join(f'"{s}"' for s in self.servers) + "]",
            "RETURN_ROUTED_EXPERTS": int(self.return_routed_experts),
            "SERVER_DTYPE": self.server_dtype,
            "MODEL_TP": self.tp,
            "MODEL_PP": self.pp,
            "MODEL_EP": self.ep,
            "HF_DIR": self.hf_dir or "",
        }
        return "\n".join(f"{name}={shlex.quote(str(value))}" for name, value in values.items())


def plan_job(cfg: RunConfig, hosts: list[str], *, rollout_nodes: int, gpus_per_node: int, cpus_per_node: int,
             server_port: int) -> JobPlan:
    """Split ``hosts`` between training and rollout and size each part; ConfigError on a misfit."""
    mode = cfg.rollout.mode
    if mode == "colocated" and rollout_nodes:
        raise ConfigError(f"ROLLOUT_NODES={rollout_nodes}, but rollout.mode is 'colocated': the trainer "
                          "starts its own servers (set ROLLOUT_NODES=0, or rollout.mode = 'disaggregated')")
    if mode == "disaggregated" and not rollout_nodes:
        raise ConfigError("rollout.mode is 'disaggregated' but ROLLOUT_NODES=0: no node would serve rollouts")
    if not 0 <= rollout_nodes < len(hosts):
        raise ConfigError(f"ROLLOUT_NODES={rollout_nodes} leaves no training node among the job's "
                          f"{len(hosts)} node(s) ({','.join(hosts)})")
    split = len(hosts) - rollout_nodes
    train_hosts, rollout_hosts = hosts[:split], hosts[split:]
    if gpus_per_node:
        tasks_per_node = gpus_per_node
        if gpus_per_node % cfg.rollout.server_tp:
            raise ConfigError(f"rollout.server_tp = {cfg.rollout.server_tp} does not divide the "
                              f"{gpus_per_node} GPUs of a rollout node")
        servers_per_node = gpus_per_node // cfg.rollout.server_tp
    else:
        from megatron_sapo.parallel.spawn import world_size_for

        tasks_per_node = world_size_for(cfg.parallel)
        servers_per_node = 1
    world = tasks_per_node * len(train_hosts)
    try:
        data_parallel = cfg.data_parallel_size(world)
    except ConfigError as err:
        raise ConfigError(f"{len(train_hosts)} training node(s) x {tasks_per_node} ranks: {err}") from None
    return JobPlan(mode=mode, train_hosts=train_hosts, rollout_hosts=rollout_hosts,
                   tasks_per_node=tasks_per_node, cpus_per_task=max(1, cpus_per_node // tasks_per_node),
                   data_parallel=data_parallel,
                   server_tp=cfg.rollout.server_tp, servers_per_node=servers_per_node if rollout_hosts else 0,
                   server_port=server_port, return_routed_experts=cfg.train.routing_replay == "r3",
                   server_dtype=SERVED_DTYPES[cfg.model.params_dtype],
                   tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, hf_dir=cfg.model.hf_dir)


def job_hosts(explicit: str | None) -> list[str]:
    """The allocation's hosts: ``explicit`` (a Slurm node list) or SLURM_JOB_NODELIST."""
    for name, text in (("--hosts", explicit), ("SLURM_JOB_NODELIST", os.environ.get("SLURM_JOB_NODELIST")),
                       ("SLURM_NODELIST", os.environ.get("SLURM_NODELIST"))):
        if text:
            return expand_nodelist(text, name)
    raise ConfigError("no node list: run inside a SLURM allocation (SLURM_JOB_NODELIST) or pass --hosts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the SLURM job layout of a run config as shell assignments.")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--hosts", help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--rollout-nodes", type=int, default=0)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--server-port", type=int, default=30000)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        plan = plan_job(cfg, job_hosts(args.hosts), rollout_nodes=args.rollout_nodes,
                        gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                        server_port=args.server_port)
    except (ConfigError, LaunchError, ValueError) as err:
        print(f"job_plan: error: {err}", file=sys.stderr)
        return 2
    print(plan.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
