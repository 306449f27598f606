"""The planner on its own: the shipped configs fit the hardware their comments name, a layout
made not to fit is refused with its reason, parameter counts against the architecture's
arithmetic, microbatch shapes, and bad input. (tests/distributed/test_plan_memory.py holds the
planned peaks to measured ones.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sapo.config import ConfigError
from megatron_sapo.config_file import load_config
from megatron_sapo.plan.layout import Hardware
from megatron_sapo.plan.memory import microbatch_shape
from megatron_sapo.plan.planner import GIB, Assumptions, plan_run

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
TEXT = REPO / "examples" / "qwen3_30b_a3b"
VL = REPO / "examples" / "qwen3_vl_30b_a3b"
CLUSTER = Hardware(nodes=4, gpus_per_node=8, gpu_memory_gib=79.2, rollout_nodes=2)
"""What the 30B-A3B configs' comments and sbatch files name: 4 training and 2 rollout nodes of
8 x 80 GB (torch reports 79.2 GiB for an 80 GB A100/H100)."""


def _config(path: Path, *overrides: str):
    return load_config(path, ["train.out_dir=unused", *overrides])


@pytest.mark.parametrize("path", [TEXT / "sapo.toml", TEXT / "gspo.toml", TEXT / "grpo_r2.toml", VL / "sapo.toml"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_30b_configs_fit_8_x_80gb_nodes(path):
    plan = plan_run(_config(path), CLUSTER, hf_config=str(path.parent / "hf_config.json"))
    assert plan.fits, plan.reasons()
    worst = plan.fullest
    # Room to spare: the fp32 gradient buffer and Adam are most of it, the logits the largest transient.
    assert 40 * GIB < worst.peak < 60 * GIB, worst.breakdown
    assert worst.breakdown["logits"] > worst.breakdown["activations"]
    assert plan.rollout.sequences >= 64 and plan.rollout.servers == 4


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("tiny_cpu*/*.toml")),
                         ids=lambda p: p.parent.name + "/" + p.name)
def test_shipped_cpu_configs_fit_the_cpu_demo(path):
    """The CPU demos: one model copy's ranks on a 24 GiB machine, each rank a "GPU" of 8 GiB."""
    from megatron_sapo.parallel.spawn import world_size_for

    cfg = _config(path)
    world = world_size_for(cfg.parallel)
    plan = plan_run(cfg, Hardware(nodes=1, gpus_per_node=world, gpu_memory_gib=8), device="cpu", te=False)
    assert plan.fits, plan.reasons()
    assert plan.fullest.tensor_peak < 1 * GIB


def test_a_layout_made_not_to_fit_is_refused_with_its_reason():
    """Local attention (18K x 18K scores), no recompute, 4 rows of 18K tokens per microbatch."""
    cfg = _config(TEXT / "sapo.toml", 'model.transformer_impl="local"', 'parallel.recompute="none"',
                  "train.max_tokens_per_microbatch=0", "train.pack_sequences=false", "train.micro_batch_size=4")
    plan = plan_run(cfg, CLUSTER, hf_config=str(TEXT / "hf_config.json"))
    assert not plan.fits
    (reason,) = plan.reasons()
    assert "pipeline stage 0" in reason and "largest item: activations" in reason, reason
    assert plan.fullest.shape.rows == 4 and plan.fullest.shape.seq == 18432
    # The same layout with the shipped settings back fits: the refusal is the layout's.
    assert plan_run(_config(TEXT / "sapo.toml"), CLUSTER, hf_config=str(TEXT / "hf_config.json")).fits


def test_parameters_per_rank_follow_the_architecture():
    """Qwen3-30B-A3B at TP4 / EP8 / PP2 against the arithmetic of its config.json."""
    hf = json.loads((TEXT / "hf_config.json").read_text())
    cfg = _config(TEXT / "sapo.toml", "parallel.pp=2")
    plan = plan_run(cfg, Hardware(nodes=8, gpus_per_node=8, gpu_memory_gib=79.2, rollout_nodes=2),
                    hf_config=str(TEXT / "hf_config.json"))
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    experts, width = hf["num_experts"], hf["moe_intermediate_size"]
    q, kv, d = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"], hf["head_dim"]
    padded_vocab = 152064  # 151,936 padded to a multiple of 128 x TP
    # Per layer: QKV and output projection split over TP4; the two norms, the Q/K norms and the
    # router replicated; the experts split over EP8.
    layer_dense = (h * (q + 2 * kv) + q * h) // 4 + 2 * h + 2 * d + experts * h
    first, last = plan.layout.stages
    assert first.expert == last.expert == layers // 2 * experts // 8 * 3 * h * width
    assert first.dense == padded_vocab // 4 * h + layers // 2 * layer_dense
    assert last.dense == padded_vocab // 4 * h + layers // 2 * layer_dense + h  # output layer and final norm
    assert plan.layout.dp == 8 and plan.layout.edp == 4
    whole_layer = h * (q + 2 * kv) + q * h + 2 * h + 2 * d + experts * h + experts * 3 * h * width
    assert plan.layout.total_params == 2 * padded_vocab * h + h + layers * whole_layer
    # The first stage holds pp - 0 = 2 microbatches in flight, the last one.
    assert plan.stages[0].activation_items["recompute chunk inputs"] == 2 * plan.stages[1].activation_items[
        "recompute chunk inputs"]


def test_microbatch_shape_is_the_largest_the_batching_allows():
    cfg = _config(TEXT / "sapo.toml")
    assert (s := microbatch_shape(cfg, rows=32)).rows == 1 and s.seq == 36864  # packed budget
    assert microbatch_shape(cfg, rows=1).seq == 18432  # one row cannot fill the budget
    padded = _config(TEXT / "sapo.toml", "train.pack_sequences=false")
    assert (s := microbatch_shape(padded, rows=32)).rows == 2 and s.seq == 18432
    fixed = _config(TEXT / "sapo.toml", "train.max_tokens_per_microbatch=0", "train.micro_batch_size=3")
    assert (s := microbatch_shape(fixed, rows=32)).rows == 3 and s.seq == 18432
    assert microbatch_shape(fixed, rows=2).rows == 2


def test_assumptions_are_overridable_and_checked():
    a = Assumptions().replaced({"mfu": 0.5, "expert_load": 1.5})
    assert a.timing.mfu == 0.5 and a.memory.expert_load == 1.5
    with pytest.raises(ConfigError, match="unknown assumption nonsense"):
        Assumptions().replaced({"nonsense": 1.0})
    with pytest.raises(ConfigError, match="mfu must be > 0"):
        Assumptions().replaced({"mfu": 0.0})
    slow = plan_run(_config(TEXT / "sapo.toml"), CLUSTER, hf_config=str(TEXT / "hf_config.json"),
                    assumptions=Assumptions().replaced({"mfu": 0.125}))
    fast = plan_run(_config(TEXT / "sapo.toml"), CLUSTER, hf_config=str(TEXT / "hf_config.json"))
    assert slow.timing.train_s == pytest.approx(2 * fast.timing.train_s)


def test_bad_input_gets_the_configs_own_error(tmp_path):
    with pytest.raises(ConfigError, match="world size 30 is not divisible by parallel.tp"):
        plan_run(_config(TEXT / "sapo.toml"), Hardware(nodes=5, gpus_per_node=6, gpu_memory_gib=80),
                 hf_config=str(TEXT / "hf_config.json"))
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        plan_run(_config(TEXT / "sapo.toml"), CLUSTER, hf_config=str(other))
    with pytest.raises(FileNotFoundError, match="give its config.json with --hf-config"):
        plan_run(_config(TEXT / "sapo.toml", f"model.hf_dir={tmp_path / 'absent'}"), CLUSTER)


# ---- train's check at start --------------------------------------------------------------------

@pytest.fixture
def thirty_b_dir(tmp_path):
    """An HF folder holding only Qwen3-30B-A3B's config.json: all the planner reads."""
    import shutil

    shutil.copy(TEXT / "hf_config.json", tmp_path / "config.json")
    return tmp_path


def test_train_refuses_a_plan_that_does_not_fit_the_gpus_it_sees(thirty_b_dir, monkeypatch, capsys):
    """The GPU machine is the one stand-in: a CPU machine has none, so ``local_gpus`` reports 8
    of 40 GiB and TransformerEngine counts as installed."""
    from megatron_sapo import cli
    from megatron_sapo.plan import command

    import megatron_sapo.models

    monkeypatch.setattr(command, "local_gpus", lambda: (8, 40.0, "40 GiB test GPU"))
    monkeypatch.setattr(megatron_sapo.models, "_transformer_engine_missing", lambda: [])  # with it, TE
    for name, value in dict(RANK="0", WORLD_SIZE="32", LOCAL_RANK="0", LOCAL_WORLD_SIZE="8", MASTER_ADDR="localhost",
                            MASTER_PORT="29500").items():  # rank 0 of a torchrun launch of 4 nodes x 8
        monkeypatch.setenv(name, value)
    args = ["train", str(TEXT / "sapo.toml"), "--output", str(thirty_b_dir / "run"),
            "--set", f"model.hf_dir={thirty_b_dir}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "of 40.00 GiB (GPU memory (this machine's 40 GiB test GPU)): DOES NOT FIT" in err  # the breakdown
    assert "4 node(s) x 8 GPUs" in err and "DP 8, expert DP 4" in err  # the launch's world
    assert err.strip().splitlines()[-1].startswith("megatron-sapo train: error: the plan does not fit: training GPU")
    assert "--no-plan-check runs anyway" in err
    assert not (thirty_b_dir / "run").exists()  # refused before anything started


def test_train_checks_only_on_gpu_machines_and_not_with_no_plan_check(thirty_b_dir, tmp_path, monkeypatch):
    from megatron_sapo import train_command
    from megatron_sapo.parallel import spawn
    from megatron_sapo.plan import command

    checked = []
    monkeypatch.setattr(train_command, "check_plan", lambda cfg: checked.append(cfg))
    monkeypatch.setattr(spawn, "spawn", lambda *a, **k: None)  # the run itself is not under test here
    parser = __import__("argparse").ArgumentParser()
    train_command.register(parser.add_subparsers())
    base = ["train", str(REPO / "examples" / "tiny_cpu" / "sapo.toml"), "--output", str(tmp_path / "run")]
    for name in train_command.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert train_command.run(parser.parse_args(base)) == 0 and len(checked) == 1
    assert train_command.run(parser.parse_args(base + ["--no-plan-check"])) == 0 and len(checked) == 1
    monkeypatch.undo()
    monkeypatch.setattr(command, "local_gpus", lambda: None)

    def planned(*args, **kwargs):
        raise AssertionError("planned on a machine without GPUs")

    monkeypatch.setattr(command, "check_fits", planned)
    train_command.check_plan(_config(TEXT / "sapo.toml", f"model.hf_dir={thirty_b_dir}"))


def test_generating_ahead_on_rollout_nodes_overlaps_rollout_with_training():
    """The shipped 30B-A3B config generates one step ahead on its rollout nodes: a step takes
    max(rollout, train) + sync; strictly alternating (k = 0), or with no rollout nodes, the sum."""
    ahead = plan_run(_config(TEXT / "sapo.toml"), CLUSTER, hf_config=str(TEXT / "hf_config.json")).timing
    turns = plan_run(_config(TEXT / "sapo.toml", "rollout.max_staleness=0"), CLUSTER,
                     hf_config=str(TEXT / "hf_config.json")).timing
    assert ahead.overlapped and not turns.overlapped
    assert ahead.step_s == pytest.approx(max(ahead.train_s, ahead.rollout_s) + ahead.sync_s)
    assert turns.step_s == pytest.approx(turns.train_s + turns.rollout_s + turns.sync_s)
    assert ahead.step_s < turns.step_s
    print(f"\n30B-A3B plan: train {ahead.train_s:.0f} s, rollout {ahead.rollout_s:.0f} s, sync {ahead.sync_s:.1f} s; "
          f"step {turns.step_s:.0f} s in turns, {ahead.step_s:.0f} s generating ahead")
