"""The SLURM launch: scripts, the Qwen3-30B-A3B configs, the job layout, and a real rehearsal.

Fast checks (no SLURM needed): every script parses (``bash -n``); the three 30B-A3B configs
load with ``load_config`` and differ only in the algorithm; the sbatch headers ask for what the
launcher relies on (requeue, a warning signal to the batch shell, appended output, nodes and
GPUs); ``job_plan.py`` splits an allocation and refuses layouts that do not fit; and
``launch_rl.sh`` under ``DRY_RUN=1`` prints the steps a job would run, adding ``--resume`` only
when the run folder holds a checkpoint.

Slow: ``tools/slurm_rehearsal.sh`` builds a 3-node SLURM cluster on this machine (a network and
UTS namespace per node, a slurmd in each), submits the CPU demo through the same launcher in
the 30B-A3B job's shape (a rollout node serving, two training nodes, weights broadcast across
nodes), kills the rollout node's server mid-step, sends the job SIGUSR1 after a checkpoint (as
a coming time limit does), and checks that the trainer waited for the restarted server, the job
stopped with a checkpoint, requeued itself, resumed, and that every step equals an
uninterrupted run's. It runs where SLURM is installed (``tools/setup_env.sh`` installs it as
root) and the test runs as root with network namespaces; elsewhere it skips, saying why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sapo.config import ConfigError
from megatron_sapo.config_file import load_config

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
CONFIG_DIR = REPO / "examples" / "qwen3_30b_a3b"
ALGORITHMS = ("sapo", "gspo", "grpo_r2")
SCRIPTS = sorted([*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch"), REPO / "tools" / "slurm_rehearsal.sh"])

sys.path.insert(0, str(SLURM_DIR))
from job_plan import plan_job  # noqa: E402  (a script beside the sbatch files, not a package)


def sbatch_directives(path: Path) -> dict[str, str]:
    """``#SBATCH --name=value`` lines of a script (``--flag`` alone maps to "")."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


# ---- scripts ---------------------------------------------------------------------------------

def test_the_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {f"{a}_30b_a3b.sbatch" for a in ALGORITHMS} | {"tiny_cpu.sbatch", "tiny_cpu_multinode.sbatch",
                                                          "launch_rl.sh", "serve_node.sh", "slurm_rehearsal.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---- the 30B-A3B configs ---------------------------------------------------------------------

def load_30b(algorithm: str):
    return load_config(CONFIG_DIR / f"{algorithm}.toml", ["train.out_dir=runs/x"])


def test_30b_configs_carry_the_published_hyperparameters():
    sapo, gspo, grpo = (load_30b(a) for a in ALGORITHMS)
    assert (sapo.loss.name, sapo.loss.tau_pos, sapo.loss.tau_neg) == ("sapo", 1.0, 1.05)
    assert (gspo.loss.name, gspo.loss.eps_low, gspo.loss.eps_high) == ("gspo", 3e-4, 4e-4)
    assert (grpo.loss.name, grpo.loss.eps_low, grpo.loss.eps_high, grpo.train.routing_replay) == ("grpo", 0.2, 0.28,
                                                                                                    "r2")
    for cfg in (sapo, gspo, grpo):
        assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.etp) == (4, 1, 8, 1)
        assert cfg.parallel.sequence_parallel
        assert cfg.model.params_dtype == "bf16"
        assert (cfg.rollout.mode, cfg.rollout.group_size, cfg.train.minibatches) == ("disaggregated", 16, 4)
        assert cfg.rollout.weight_sync == "distributed"  # servers on other nodes: no same-host tensor path
        assert cfg.eval.samples_per_problem == 16 and cfg.eval.every > 0
        assert cfg.optimizer.lr == 1e-6
        assert cfg.rollout.max_new_tokens >= 16384
        assert cfg.checkpoint.save_every > 0  # what a requeued job resumes from
        # 4 training nodes of 8 GPUs: DP 8 splits the prompts and every minibatch.
        assert cfg.data_parallel_size(32) == 8


def test_30b_configs_differ_only_in_the_algorithm():
    def without_algorithm(cfg) -> dict:
        data = dataclasses.asdict(cfg)
        del data["loss"]
        del data["train"]["routing_replay"]
        return data

    sapo, gspo, grpo = (load_30b(a) for a in ALGORITHMS)
    assert without_algorithm(sapo) == without_algorithm(gspo) == without_algorithm(grpo)
    assert sapo.loss != gspo.loss != grpo.loss
    assert sapo.train.routing_replay == gspo.train.routing_replay == "none"


def test_vl_30b_config_is_the_text_run_with_images():
    vl = load_config(REPO / "examples" / "qwen3_vl_30b_a3b" / "sapo.toml", ["train.out_dir=runs/x"])
    text = load_30b("sapo")
    assert vl.model.hf_dir.endswith("Qwen3-VL-30B-A3B-Instruct") and vl.data.image_key == "images"
    assert (vl.parallel, vl.loss, vl.rollout, vl.optimizer) == (text.parallel, text.loss, text.rollout, text.optimizer)
    assert vl.train.max_seq_len >= vl.data.max_prompt_tokens + vl.rollout.max_new_tokens
    plan = plan_job(vl, [f"gpu{i:03d}" for i in range(1, 7)], rollout_nodes=2, gpus_per_node=8, cpus_per_node=96,
                    server_port=30000)
    assert (plan.data_parallel, plan.server_tp, plan.servers_per_node) == (8, 4, 2)


# ---- sbatch headers --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_30b_sbatch_header(algorithm):
    path = SLURM_DIR / f"{algorithm}_30b_a3b.sbatch"
    directives = sbatch_directives(path)
    assert "requeue" in directives
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"])  # the batch shell traps it
    assert directives["open-mode"] == "append"  # a requeued run appends to the same log
    assert int(directives["nodes"]) == 6 and int(directives["gpus-per-node"]) == 8
    assert int(directives["ntasks-per-node"]) == 8
    text = path.read_text()
    assert f"CONFIG:-examples/qwen3_30b_a3b/{algorithm}.toml" in text
    assert "ROLLOUT_NODES:-2" in text and "examples/slurm/launch_rl.sh" in text


def test_tiny_cpu_sbatch_header():
    path = SLURM_DIR / "tiny_cpu.sbatch"
    directives = sbatch_directives(path)
    assert "requeue" in directives and directives["open-mode"] == "append"
    assert int(directives["nodes"]) == 1 and int(directives["ntasks"]) == 2
    assert not any("gpu" in name or "gres" in name for name in directives)
    text = path.read_text()
    assert "CONFIG:-examples/tiny_cpu/sapo.toml" in text and "GPUS_PER_NODE=0" in text
    assert "examples/slurm/launch_rl.sh" in text


def test_tiny_cpu_multinode_sbatch_header():
    path = SLURM_DIR / "tiny_cpu_multinode.sbatch"
    directives = sbatch_directives(path)
    assert "requeue" in directives and directives["open-mode"] == "append"
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"])
    assert int(directives["nodes"]) == 3 and int(directives["ntasks-per-node"]) == 1
    text = path.read_text()
    assert "ROLLOUT_NODES:-1" in text and "GPUS_PER_NODE=0" in text
    assert "rollout.mode=disaggregated" in text and "rollout.weight_sync=distributed" in text


# ---- job_plan.py -----------------------------------------------------------------------------

def test_plan_splits_nodes_between_training_and_rollout():
    hosts = [f"gpu{i:03d}" for i in range(1, 7)]
    plan = plan_job(load_30b("sapo"), hosts, rollout_nodes=2, gpus_per_node=8, cpus_per_node=96, server_port=30000)
    assert plan.train_hosts == hosts[:4] and plan.rollout_hosts == hosts[4:]
    assert (plan.tasks_per_node, plan.cpus_per_task, plan.data_parallel) == (8, 12, 8)
    assert (plan.server_tp, plan.servers_per_node) == (4, 2)
    assert plan.servers == ["gpu005:30000", "gpu005:30001", "gpu006:30000", "gpu006:30001"]
    assert not plan.return_routed_experts


def test_plan_of_the_cpu_demo():
    plan = plan_job(load_config(REPO / "examples" / "tiny_cpu" / "sapo.toml"), ["vm"], rollout_nodes=0,
                    gpus_per_node=0, cpus_per_node=2, server_port=30000)
    assert (plan.mode, plan.train_hosts, plan.tasks_per_node, plan.cpus_per_task) == ("colocated", ["vm"], 2, 1)
    assert plan.servers == [] and plan.hf_dir is None


def test_plan_of_the_multinode_cpu_demo():
    cfg = load_config(REPO / "examples" / "tiny_cpu" / "sapo.toml",
                      ["parallel.tp=1", "rollout.mode=disaggregated", 'rollout.servers=["localhost:30000"]'])
    plan = plan_job(cfg, ["n1", "n2", "n3"], rollout_nodes=1, gpus_per_node=0, cpus_per_node=2, server_port=30000)
    assert (plan.train_hosts, plan.rollout_hosts) == (["n1", "n2"], ["n3"])
    assert (plan.tasks_per_node, plan.cpus_per_task, plan.data_parallel) == (1, 2, 2)
    assert plan.servers == ["n3:30000"] and plan.hf_dir is None


def test_plan_asks_for_routed_experts_under_r3():
    cfg = load_config(CONFIG_DIR / "grpo_r2.toml", ["train.routing_replay=r3"])
    plan = plan_job(cfg, ["a", "b"], rollout_nodes=1, gpus_per_node=8, cpus_per_node=8, server_port=30000)
    assert plan.return_routed_experts


@pytest.mark.parametrize("change, message", [
    (dict(rollout_nodes=0), "ROLLOUT_NODES=0"),
    (dict(rollout_nodes=6), "leaves no training node"),
    (dict(gpus_per_node=6), "does not divide the 6 GPUs"),
])
def test_plan_refuses_layouts_that_do_not_fit(change, message):
    kwargs = dict(rollout_nodes=2, gpus_per_node=8, cpus_per_node=96, server_port=30000) | change
    with pytest.raises(ConfigError, match=message):
        plan_job(load_30b("sapo"), [f"n{i}" for i in range(6)], **kwargs)


def test_plan_refuses_a_data_parallel_size_the_batch_does_not_split():
    cfg = load_config(CONFIG_DIR / "sapo.toml", ["rollout.prompts_per_step=4"])  # 4 prompts over DP 8
    with pytest.raises(ConfigError, match=r"4 training node\(s\) x 8 ranks: .*not divisible by the data-parallel"):
        plan_job(cfg, [f"n{i}" for i in range(6)], rollout_nodes=2, gpus_per_node=8, cpus_per_node=96,
                 server_port=30000)


def test_plan_refuses_rollout_nodes_when_colocated():
    with pytest.raises(ConfigError, match="colocated"):
        plan_job(load_config(REPO / "examples" / "tiny_cpu" / "sapo.toml"), ["a", "b"], rollout_nodes=1,
                 gpus_per_node=0, cpus_per_node=2, server_port=30000)


# ---- launch_rl.sh, dry run -------------------------------------------------------------------

def test_a_job_that_cannot_fit_fails_before_converting(tmp_path):
    """Not a dry run: the launcher's plan check runs for real (no SLURM is needed before the
    first srun) and stops the job, in seconds, before the conversion or any server starts."""
    model = tmp_path / "Qwen3-30B-A3B"
    model.mkdir()
    shutil.copy(CONFIG_DIR / "hf_config.json", model / "config.json")  # the planner reads nothing else
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NAME="too-big", SLURM_JOB_NODELIST="gpu[1-6]", SLURM_CPUS_ON_NODE="96",
               GPUS_PER_NODE="8", ROLLOUT_NODES="2", CONFIG="examples/qwen3_30b_a3b/sapo.toml", HF_MODEL=str(model),
               RUN_ROOT=str(tmp_path / "runs"), TORCHDYNAMO_DISABLE="1",
               SETS='model.transformer_impl="local" parallel.recompute="none" train.max_tokens_per_microbatch=0 '
                    "train.pack_sequences=false train.micro_batch_size=4")
    done = subprocess.run(["bash", str(SLURM_DIR / "launch_rl.sh")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the run does not fit its GPUs" in done.stderr
    assert "does not fit: training GPU of pipeline stage 0 needs" in done.stderr  # the plan's reason
    assert "converting" not in done.stdout and not (tmp_path / "runs" / "mcore").exists()


def dry_run(tmp_path: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update({"DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sapo-30b-a3b", "SLURM_CPUS_ON_NODE": "96",
                 "RUN_ROOT": str(tmp_path / "runs"), **env})
    done = subprocess.run(["bash", str(SLURM_DIR / "launch_rl.sh")], env=base, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def commands(output: str, program: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"+ {program} ")]


def test_dry_run_of_a_30b_job(tmp_path):
    out = dry_run(tmp_path, SLURM_JOB_NODELIST="gpu[001-006]", GPUS_PER_NODE="8", ROLLOUT_NODES="2",
                  CONFIG="examples/qwen3_30b_a3b/sapo.toml", HF_MODEL="/models/Qwen3-30B-A3B", STEPS="3")
    plan, convert = commands(out, "megatron-sapo")
    assert plan.startswith("+ megatron-sapo plan examples/qwen3_30b_a3b/sapo.toml --set model.hf_dir=/models/")
    assert plan.endswith("--nodes 4 --rollout-nodes 2 --gpus-per-node 8 ")
    assert "convert hf-to-mcore --hf /models/Qwen3-30B-A3B" in convert and "--tp 4 --pp 1 --ep 8" in convert
    servers, train = commands(out, "srun")[:2], commands(out, "srun")[2]
    for host, line in zip(("gpu005", "gpu006"), servers):
        assert f"--nodelist={host}" in line and "serve_node.sh /models/Qwen3-30B-A3B 30000 2 4" in line
        assert line.rstrip().endswith("--dtype bfloat16")  # servers hold the weights as trained
    assert "--nodes=4 --ntasks=32 --ntasks-per-node=8" in train
    assert "--nodelist=gpu001\\,gpu002\\,gpu003\\,gpu004" in train
    assert "megatron-sapo train examples/qwen3_30b_a3b/sapo.toml" in train
    assert f"--output {tmp_path}/runs/sapo-30b-a3b-4242" in train
    assert "--steps 3" in train and "--set model.hf_dir=/models/Qwen3-30B-A3B" in train
    assert 'rollout.servers=\\[\\"gpu005:30000\\"' in train
    assert "--resume" not in train
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_resumes_only_from_an_existing_checkpoint(tmp_path):
    env = dict(SLURM_JOB_NODELIST="vm", ROLLOUT_NODES="0", GPUS_PER_NODE="0", SLURM_CPUS_ON_NODE="2",
               CONFIG="examples/tiny_cpu/sapo.toml", RUN_NAME="demo", SETS="train.sft_steps=20 eval.every=0")
    out = dry_run(tmp_path, **env)
    assert "no GPUs: the memory plan is not checked" in out and not commands(out, "megatron-sapo")
    train, = commands(out, "srun")
    assert "--ntasks=2 --ntasks-per-node=2 --cpus-per-task=1" in train
    assert "--set train.sft_steps=20 --set eval.every=0" in train and "rollout.servers" not in train
    assert "--resume" not in train
    checkpoints = tmp_path / "runs" / "demo" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step_00000002\n")
    out = dry_run(tmp_path, **env)
    train, = commands(out, "srun")
    assert train.rstrip().endswith("--resume")
    assert "resuming from checkpoint step_00000002" in out


def test_dry_run_of_the_multinode_cpu_demo(tmp_path):
    """A built-in model served by a rollout node: written once into the run folder, converted
    there, served from there."""
    sets = 'parallel.tp=1 rollout.mode=disaggregated rollout.servers=["localhost:30000"]'
    out = dry_run(tmp_path, SLURM_JOB_NODELIST="n[1-3]", ROLLOUT_NODES="1", GPUS_PER_NODE="0", SLURM_CPUS_ON_NODE="2",
                  CONFIG="examples/tiny_cpu/sapo.toml", RUN_NAME="demo", SETS=sets)
    run_dir = f"{tmp_path}/runs/demo"
    prepare, convert = commands(out, "megatron-sapo")
    assert prepare.startswith(f"+ megatron-sapo train examples/tiny_cpu/sapo.toml --output {run_dir} ")
    assert prepare.rstrip().endswith("--prepare-only")
    assert f"convert hf-to-mcore --hf {run_dir}/start_model --out {run_dir}/mcore --tp 1 --pp 1 --ep 1" in convert
    server, train = commands(out, "srun")
    assert "--nodelist=n3" in server and f"serve_node.sh {run_dir}/start_model 30000 1 1" in server
    assert server.rstrip().endswith("--dtype float32")  # the demo trains in fp32
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=2" in train and "--nodelist=n1\\,n2" in train
    assert 'rollout.servers=\\[\\"n3:30000\\"\\]' in train


def test_prepare_only_writes_the_start_model_and_stops(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_cpu/sapo.toml",
                           "--output", str(out), "--set", "train.sft_steps=2", "--prepare-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "start_model")
    assert (out / "start_model" / "config.json").is_file() and (out / "start_model" / "cold_start_losses.json").is_file()
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_launcher_refuses_a_layout_that_does_not_fit(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(DRY_RUN="1", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="gpu[1-2]", GPUS_PER_NODE="8", ROLLOUT_NODES="0",
                CONFIG="examples/qwen3_30b_a3b/sapo.toml", RUN_ROOT=str(tmp_path))
    done = subprocess.run(["bash", str(SLURM_DIR / "launch_rl.sh")], env=base, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "ROLLOUT_NODES=0" in done.stderr and "srun" not in done.stdout


# ---- the rehearsal on a real multi-node SLURM -------------------------------------------------

def _rehearsal_skip_reason() -> str | None:
    missing = [tool for tool in ("sbatch", "slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not on PATH (tools/setup_env.sh installs SLURM and munge from Debian "
                "packages when run as root)")
    if os.geteuid() != 0:
        return "the rehearsal creates network namespaces and starts munge and the SLURM daemons: it needs root"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine does not allow network namespaces ({probe.stderr.strip()})"
    return None


@pytest.mark.slow
def test_multinode_rehearsal_survives_a_killed_server_and_a_requeue(tmp_path):
    reason = _rehearsal_skip_reason()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(REHEARSAL_DIR=str(tmp_path / "slurm"))
    done = subprocess.run(["bash", str(REPO / "tools" / "slurm_rehearsal.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == dict(nodes=3, train_nodes=2, rollout_nodes=1, steps=3, requeued=1, resumed_from=2,
                          seconds=result["seconds"])
    assert "every step equals the uninterrupted run's" in done.stdout
    assert not [line for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                                                text=True).stdout.splitlines() if ": msapo-" in line]
