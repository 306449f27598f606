"""The run configuration: TOML loading, --set overrides, errors naming file and key, dump/load."""

import math
import re
import tomllib
from pathlib import Path

import pytest

from megatron_sapo.config import (
    BuiltinModelConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
)
from megatron_sapo.config_file import dump_config, load_config

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu"
STRESS = EXAMPLES.parent / "stress_cpu"

MINIMAL = """
[model]
hf_dir = "ckpt/qwen3"

[data]
train_path = "prompts.jsonl"
"""


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_text(excinfo):
    return str(excinfo.value)


def test_minimal_file_takes_defaults_and_names_the_output_folder_after_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL, "my_run.toml"))
    assert cfg.model == ModelConfig(hf_dir="ckpt/qwen3")
    assert cfg.rollout == RolloutConfig() and cfg.loss == LossConfig() and cfg.eval == EvalConfig()
    assert cfg.train.out_dir == str(Path("runs") / "my_run")
    assert cfg.data.train_path == "prompts.jsonl" and cfg.data.reward is None


@pytest.mark.parametrize("folder, minibatches", [(EXAMPLES, 4), (STRESS, 16)])
def test_examples_load_and_differ_only_in_loss_name_and_routing_replay(folder, minibatches):
    tables = {}
    for name in ("sapo", "gspo", "grpo_r2"):
        cfg = load_config(folder / f"{name}.toml")
        assert cfg.model.builtin == "tiny-qwen3-moe" and cfg.model.params_dtype == "fp32"
        assert cfg.parallel.tp == 2 and cfg.parallel.data_parallel_size(2) == 1
        assert cfg.rollout.mode == "colocated" and cfg.rollout.group_size == 8
        assert cfg.data.task is not None and cfg.train.minibatches == minibatches
        assert cfg.data_parallel_size(2) == 1
        tables[name] = tomllib.loads((folder / f"{name}.toml").read_text())
    assert tables["sapo"]["loss"] == {"name": "sapo"}
    assert tables["gspo"]["loss"] == {"name": "gspo"}
    assert tables["grpo_r2"]["loss"] == {"name": "grpo"}
    assert tables["sapo"]["train"]["routing_replay"] == "none"
    assert tables["grpo_r2"]["train"]["routing_replay"] == "r2"
    for table in tables.values():
        table.pop("loss")
        table["train"].pop("routing_replay")
    assert tables["gspo"] == tables["sapo"] and tables["grpo_r2"] == tables["sapo"]


def test_overrides_parse_toml_values_or_fall_back_to_strings(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, [
        "loss.tau_neg=1",                      # an integer for a float field becomes a float
        "loss.name=grpo",                      # a bare word is a string
        'rollout.mode="disaggregated"',
        'rollout.servers=["a:1","b:2"]',
        "data.train_path=other/x.jsonl",       # not TOML: taken as a string
        "rollout.temperature=0.7",
        "logging.tensorboard=false",
        "rollout.sampling_seed=7",
    ])
    assert cfg.loss.tau_neg == 1.0 and isinstance(cfg.loss.tau_neg, float)
    assert cfg.loss.name == "grpo" and cfg.loss.eps_low == 0.2
    assert cfg.rollout.servers == ["a:1", "b:2"] and cfg.rollout.mode == "disaggregated"
    assert cfg.data.train_path == "other/x.jsonl"
    assert cfg.rollout.temperature == 0.7 and cfg.logging.tensorboard is False
    assert cfg.rollout.sampling_seed == 7


def test_unknown_keys_and_sections_name_the_file_and_suggest(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[rollout]\ngruop_size = 8\n", "x.toml")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert error_text(excinfo) == f"{path}: unknown key rollout.gruop_size (did you mean group_size?)"

    path = write(tmp_path, MINIMAL + "\n[rollouts]\ngroup_size = 8\n", "y.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown section [rollouts] (did you mean rollout?)")):
        load_config(path)

    with pytest.raises(ConfigError, match=re.escape("--set loss.tau_nge=1: unknown key loss.tau_nge (did you mean tau_neg?)")):
        load_config(write(tmp_path, MINIMAL), ["loss.tau_nge=1"])


@pytest.mark.parametrize(
    "section, line, message",
    [
        ("rollout", 'group_size = "8"', "rollout.group_size must be an integer, got '8'"),
        ("rollout", "group_size = 8.0", "rollout.group_size must be an integer, got 8.0"),
        ("rollout", "group_size = true", "rollout.group_size must be an integer, got True"),
        ("loss", "tau_neg = true", "loss.tau_neg must be a number, got True"),
        ("rollout", 'servers = "a:1"', "rollout.servers must be a list of strings, got 'a:1'"),
        ("rollout", "servers = [1]", "rollout.servers[0] must be a string, got 1"),
        ("logging", "tensorboard = 1", "logging.tensorboard must be true or false, got 1"),
        ("logging", "diagnostics_tokens = 0", "logging.diagnostics_tokens must be an integer >= 1, got 0"),
        ("logging", "diagnostics_sequences = -1", "logging.diagnostics_sequences must be an integer >= 1, got -1"),
        ("loss", "name = 3", "loss.name must be one of 'sapo', 'grpo', 'gspo', got 3"),
        ("parallel", 'recompute_num_layers = "2"', "parallel.recompute_num_layers must be an integer, got '2'"),
    ],
)
def test_wrong_types_name_the_file_and_key(tmp_path, section, line, message):
    path = write(tmp_path, MINIMAL + f"\n[{section}]\n{line}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert error_text(excinfo) == f"{path}: {message}"


def test_layer_spec_and_recompute_load_from_the_file_and_overrides(tmp_path):
    text = MINIMAL + '\n[parallel]\nrecompute = "full"\nrecompute_method = "block"\nrecompute_num_layers = 2\n'
    cfg = load_config(write(tmp_path, text), ["model.transformer_impl=local"])
    assert cfg.model.transformer_impl == "local" and ModelConfig(hf_dir="a").transformer_impl == "auto"
    assert (cfg.parallel.recompute, cfg.parallel.recompute_method, cfg.parallel.recompute_num_layers) == \
        ("full", "block", 2)
    assert load_config(write(tmp_path, dump_config(cfg), "again.toml")).parallel == cfg.parallel


def test_out_of_range_values_name_the_file_and_key(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[rollout]\ngroup_size = 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert error_text(excinfo) == f"{path}: rollout.group_size must be an integer >= 2, got 1"
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, MINIMAL), ["rollout.group_size=1"])
    assert error_text(excinfo) == f"{tmp_path / 'run.toml'} (with --set overrides): rollout.group_size must be an integer >= 2, got 1"


def test_bad_override_syntax_and_types_name_the_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    for item in ("loss.tau_neg", "tau_neg=1", "loss.x.y=1", "=1"):
        with pytest.raises(ConfigError, match=re.escape(f"--set {item}: expected section.key=value")):
            load_config(path, [item])
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["rollout.group_size=abc"])
    assert error_text(excinfo) == "--set rollout.group_size=abc: rollout.group_size must be an integer, got 'abc'"


def test_invalid_toml_and_missing_sections(tmp_path):
    path = write(tmp_path, "[model\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid TOML")):
        load_config(path)
    path = write(tmp_path, '[data]\ntrain_path = "p.jsonl"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: model needs exactly one of model.hf_dir and model.builtin")):
        load_config(path)
    path = write(tmp_path, 'model = 3\n[data]\ntrain_path = "p.jsonl"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: model must be a [model] table, got 3")):
        load_config(path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize("folder", [EXAMPLES, STRESS])
@pytest.mark.parametrize("name", ["sapo", "gspo", "grpo_r2"])
def test_examples_dump_and_load_back_equal(tmp_path, folder, name):
    cfg = load_config(folder / f"{name}.toml")
    again = load_config(write(tmp_path, dump_config(cfg), "dumped.toml"))
    assert again == cfg


def test_dump_round_trips_awkward_values(tmp_path):
    cfg = RunConfig(
        model=ModelConfig(hf_dir="C:\\models\\qwen \"30B\"", params_dtype="fp32"),
        rollout=RolloutConfig(mode="disaggregated", servers=["10.0.0.1:30000", "node-2:30001"],
                              server_args=["--chat-template", "a\tb\nc", "é ü 中", "\x01\x7f"],
                              startup_timeout_s=math.inf, sampling_seed=0, top_p=0.95, max_staleness=2,
                              partial="continue"),
        loss=LossConfig(name="gspo", eps_low=3e-4, eps_high=4e-4, dual_clip_c=3.0, tau_neg=1e-8,
                        rollout_correction="mis", rollout_correction_low=0.0, rollout_correction_high=1.5),
        data=DataConfig(train_path="d.parquet", val_path="v.jsonl", system_prompt='Say "hi"\\\n\r',
                        reward="math", prompt_key="extra.question"),
        eval=EvalConfig(every=5, max_problems=3, max_new_tokens=7),
        train=TrainConfig(out_dir="runs/x", sft_lr=None),
    )
    text = dump_config(cfg)
    assert "sft_lr" not in text and "load_dir" not in text  # unset fields are absent, not null
    again = load_config(write(tmp_path, text, "awkward.toml"))
    assert again == cfg
    assert again.rollout.startup_timeout_s == math.inf


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ModelConfig(), "model needs exactly one of model.hf_dir and model.builtin"),
        (lambda: ModelConfig(hf_dir="a", builtin="tiny-qwen3-moe"), "model needs exactly one"),
        (lambda: ModelConfig(builtin="gpt"), "model.builtin must be one of tiny-qwen3-moe, tiny-qwen3-vl-moe; got 'gpt'"),
        (lambda: ModelConfig(hf_dir="a", params_dtype="fp16"), "model.params_dtype must be one of fp32, bf16"),
        (lambda: ModelConfig(hf_dir="a", transformer_impl="te"),
         "model.transformer_impl must be one of auto, local, transformer_engine; got 'te'"),
        (lambda: ParallelConfig(recompute="all"), "parallel.recompute must be one of none, selective, full"),
        (lambda: RolloutConfig(mode="disaggregated"), 'rollout.servers must list at least one "host:port"'),
        (lambda: RolloutConfig(servers=["a:1"]), 'rollout.servers is only used when rollout.mode is "disaggregated"'),
        (lambda: RolloutConfig(mode="disaggregated", servers=["a:1", "b"]), r"rollout.servers\[1\] must be"),
        (lambda: RolloutConfig(mode="disaggregated", servers=["a:99999"]), r"rollout.servers\[0\] must be"),
        (lambda: RolloutConfig(mode="remote"), "rollout.mode must be one of colocated, disaggregated"),
        (lambda: RolloutConfig(group_size=1), "rollout.group_size must be an integer >= 2, got 1"),
        (lambda: RolloutConfig(top_p=0.0), r"rollout.top_p must be in \(0, 1\]"),
        (lambda: RolloutConfig(temperature=0), "rollout.temperature must be a number > 0"),
        (lambda: RolloutConfig(weight_sync="nccl"), "rollout.weight_sync must be one of tensor, distributed, disk"),
        (lambda: RolloutConfig(sampling_seed=-1), "rollout.sampling_seed must be an integer >= 0"),
        (lambda: RolloutConfig(max_retries=-1), "rollout.max_retries must be an integer >= 0"),
        (lambda: TrainConfig(routing_replay="r1"), "train.routing_replay must be one of none, r2, r3"),
        (lambda: TrainConfig(minibatches=0), "train.minibatches must be an integer >= 1, got 0"),
        (lambda: TrainConfig(sft_lr=0.0), "train.sft_lr must be a number > 0"),
        (lambda: DataConfig(), "data needs exactly one of data.train_path and data.task"),
        (lambda: DataConfig(train_path="a.jsonl", task="tiny-reverse"), "data needs exactly one"),
        (lambda: DataConfig(task="tiny-reverse", val_path="v.jsonl"), "data.val_path is only used with data.train_path"),
        (lambda: DataConfig(task="tiny-reverse", prompt_key=""), "data.prompt_key must be a non-empty string"),
        (lambda: DataConfig(task="tiny-reverse", reward_timeout_s=0), "data.reward_timeout_s must be a number > 0"),
        (lambda: EvalConfig(every=-1), "eval.every must be an integer >= 0"),
        (lambda: EvalConfig(max_new_tokens=0), "eval.max_new_tokens must be an integer >= 1"),
    ],
)
def test_section_validation_names_the_key(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def run(**sections):
    base = dict(model=ModelConfig(builtin="tiny-qwen3-moe"), data=DataConfig(task="tiny-reverse"))
    return RunConfig(**{**base, **sections})


@pytest.mark.parametrize(
    "sections, message",
    [
        (dict(rollout=RolloutConfig(prompts_per_step=3, group_size=3), train=TrainConfig(minibatches=4)),
         "rollout.prompts_per_step \\* rollout.group_size = 9 is not divisible by train.minibatches = 4"),
        (dict(train=TrainConfig(routing_replay="r2"), router=RouterConfig(routing_replay=False)),
         "train.routing_replay = 'r2' needs router.routing_replay = true"),
        (dict(train=TrainConfig(max_seq_len=100)), "train.max_seq_len = 100 is shorter than"),
        (dict(eval=EvalConfig(max_new_tokens=4000)), "train.max_seq_len = 2048 is shorter than .* = 5024"),
        (dict(data=DataConfig(train_path="p.jsonl"), eval=EvalConfig(every=1)),
         "eval.every > 0 needs validation prompts"),
        (dict(data=DataConfig(train_path="p.jsonl"), train=TrainConfig(sft_steps=3)), "train.sft_steps > 0 needs a data.task"),
    ],
)
def test_cross_section_checks(sections, message):
    with pytest.raises(ConfigError, match=message):
        run(**sections)


def test_reward_defaults_to_the_tasks_verifier_or_math():
    from megatron_sapo.data.checks import reward_name

    assert reward_name(DataConfig(task="tiny-reverse")) == "exact_match"
    assert reward_name(DataConfig(train_path="p.jsonl")) == "math"
    assert reward_name(DataConfig(task="tiny-reverse", reward="math")) == "math"


@pytest.mark.parametrize("override, message", [
    ("data.reward=mth", "data.reward: unknown reward 'mth'; registered: .*math"),
    ("data.task=sudoku", "data.task: unknown synthetic task 'sudoku'; known: tiny-reverse"),
])
def test_data_names_are_checked_when_the_config_loads(override, message):
    """Against data/'s registries (data/checks.py), which config.py does not import."""
    with pytest.raises(ConfigError, match=f"sapo.toml \\(with --set overrides\\): {message}"):
        load_config(Path(__file__).parents[2] / "examples" / "tiny_cpu" / "sapo.toml", [override])


def test_config_module_imports_nothing_of_data():
    import subprocess
    import sys

    code = "import sys, megatron_sapo.config; print([m for m in sys.modules if m.startswith('megatron_sapo.data')])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_data_parallel_size_checks_prompt_and_minibatch_splits():
    cfg = run(rollout=RolloutConfig(prompts_per_step=6, group_size=4), train=TrainConfig(minibatches=2))
    assert cfg.data_parallel_size(2) == 2
    with pytest.raises(ConfigError, match="rollout.prompts_per_step = 6 is not divisible by the data-parallel size 4"):
        cfg.data_parallel_size(4)
    cfg = run(rollout=RolloutConfig(prompts_per_step=4, group_size=2), train=TrainConfig(minibatches=4))
    with pytest.raises(ConfigError, match="a minibatch of 2 responses .* does not split over the data-parallel size 4"):
        cfg.data_parallel_size(4)



def test_routing_replay_modes_say_what_each_stage_does():
    modes = {mode: TrainConfig(routing_replay=mode) for mode in ("none", "r2", "r3")}
    assert [m.replays_routes for m in modes.values()] == [False, True, True]
    assert [m.records_routes for m in modes.values()] == [False, True, False]
    assert [m.routes_from_rollout for m in modes.values()] == [False, False, True]


def test_builtin_config_changes_the_built_in_models_config(tmp_path):
    from megatron_sapo.plan.layout import builtin_hf_config, read_model_config

    cfg = load_config(STRESS / "sapo.toml")
    assert cfg.model.builtin_config == BuiltinModelConfig(num_experts=16, num_experts_per_tok=2)
    hf_config, source = read_model_config(cfg)
    assert hf_config["num_experts"] == 16 and hf_config["num_experts_per_tok"] == 2
    assert hf_config["hidden_size"] == builtin_hf_config("tiny-qwen3-moe")["hidden_size"]
    assert source == "model.builtin = 'tiny-qwen3-moe' with {'num_experts': 16, 'num_experts_per_tok': 2}"
    assert builtin_hf_config("tiny-qwen3-moe")["num_experts"] == 4  # unchanged without overrides
    override = load_config(EXAMPLES / "sapo.toml", ["model.builtin_config={num_experts = 8, num_hidden_layers = 2}"])
    assert override.model.builtin_config.overrides() == {"num_experts": 8, "num_hidden_layers": 2}
    assert load_config(write(tmp_path, dump_config(override), "dumped.toml")) == override
    assert read_model_config(load_config(EXAMPLES / "sapo.toml"))[1] == "model.builtin = 'tiny-qwen3-moe'"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.builtin_config={num_experts = 16, topk = 2}",
         "model.builtin_config: unknown key topk .*known: num_experts, num_experts_per_tok, num_hidden_layers"),
        ("model.builtin_config={num_experts = 1}", "model.builtin_config.num_experts must be an integer >= 2, got 1"),
        ("model.builtin_config={num_experts = 2, num_experts_per_tok = 3}",
         "model.builtin_config.num_experts_per_tok = 3 exceeds model.builtin_config.num_experts = 2"),
        ("model.builtin_config={num_hidden_layers = 0}", "model.builtin_config.num_hidden_layers must be an integer"),
        ("model.builtin_config=16", "model.builtin_config must be a table, got 16"),
        ("model.builtin=tiny-qwen3-vl-moe", "model.builtin_config changes the built-in text model; it needs "
                                            "model.builtin = \"tiny-qwen3-moe\", not 'tiny-qwen3-vl-moe'"),
    ],
)
def test_builtin_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(STRESS / "sapo.toml", [override])


def test_builtin_config_needs_a_built_in_model_and_a_top_k_within_the_experts():
    from megatron_sapo.models.tiny import demo_config

    with pytest.raises(ConfigError, match="model.builtin_config changes the built-in text model; .* not 'ckpt'"):
        ModelConfig(hf_dir="ckpt", builtin_config=BuiltinModelConfig(num_experts=8))
    # Only one of the two set: the built-in model's 4 experts bound the top-k when the model is made.
    assert ModelConfig(builtin="tiny-qwen3-moe", builtin_config=BuiltinModelConfig(num_experts_per_tok=6))
    with pytest.raises(ConfigError, match="6 experts per token .* exceed the 4 experts of the built-in model"):
        demo_config(num_experts_per_tok=6)
    assert demo_config(num_experts=16)["num_experts"] == 16
