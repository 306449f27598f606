"""Full-state training checkpoints on 2 gloo ranks: resumes are bit-exact, saves are atomic.

A tiny random Qwen3-MoE in fp32 is trained with Megatron DDP, the distributed optimizer (Adam)
and a warm-up + cosine LR schedule. The training loss draws from every generator a checkpoint
restores (python, numpy, torch, the TP tracker), so a resume that missed one would diverge.
Equalities here are exact (torch.equal / ==): resuming must reproduce the run bit for bit.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_sapo.config import OptimizerConfig, ParallelConfig
from megatron_sapo.convert.mcore_checkpoint import load_model, read_hf_config
from megatron_sapo.models import qwen3_moe
from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.parallel import vocab_parallel_logprobs
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training import checkpoint
from megatron_sapo.training.checkpoint import (CheckpointError, TrainerState, find_latest, load_checkpoint,
                                               save_checkpoint)
from megatron_sapo.training.forward import forward_logits
from megatron_sapo.training.optimizer import build_optimizer

BATCH, SEQ = 2, 12
VOCAB = TINY_QWEN3_MOE["vocab_size"]
RUN_CONFIG = '[optimizer]\nlr = 1e-3\n'
# Warm-up then cosine decay, so a lost schedule changes the learning rate of the resumed steps.
OPTIMIZER = OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.01, adam_beta2=0.95, warmup_steps=2,
                            lr_decay_style="cosine")


@pytest.fixture
def shared_tmp(tmp_path_factory):
    """A folder both ranks see (rank 0's temporary folder)."""
    path = [str(tmp_path_factory.mktemp("ckpt")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


class Run:
    """A tiny Qwen3-MoE training setup on the launch's ranks, built from scratch."""

    def __init__(self, parallel: ParallelConfig, seed: int):
        self.pg = initialize_model_parallel(parallel, seed=seed)
        spec = qwen3_moe.from_hf_config(dict(TINY_QWEN3_MOE), parallel)
        self.model, self.optimizer, self.scheduler = build_optimizer(
            qwen3_moe.build_model(spec, self.pg), OPTIMIZER, self.pg, total_steps=10)
        # Host generators differ per DP rank (each DP rank sees its own data), agree within TP.
        dp_rank = dist.get_rank(self.pg.dp)
        random.seed(100 + seed + dp_rank)
        np.random.seed(200 + seed + dp_rank)

    def train_step(self) -> float:
        """One optimizer step; returns this rank's loss."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        tokens = torch.from_numpy(np.random.randint(0, VOCAB, (BATCH, SEQ + 1)))
        weights = torch.rand(BATCH, SEQ) * random.uniform(0.5, 1.5)
        with get_cuda_rng_tracker().fork():  # differs per TP rank: averaged so TP ranks agree
            noise = torch.rand(BATCH, SEQ)
        dist.all_reduce(noise, group=self.pg.tp)
        weights = weights * (1 + noise / dist.get_world_size(self.pg.tp))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(SEQ).expand(BATCH, -1)

        def forward_step(data_iterator, model):
            def loss_func(logits):
                loss = -(vocab_parallel_logprobs(logits, targets, self.pg.tp) * weights).mean()
                return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales it in place

            return model(inputs, positions, None), loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[self.model],
            num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
            pg_collection=self.pg)
        updated, _, _ = self.optimizer.step()
        assert updated
        self.scheduler.step(increment=1)
        return losses[0]["loss"].item()

    def snapshot(self) -> dict:
        """Weights, Adam state (moments, step, main params) and learning rates, cloned."""
        inner = [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        adam = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                for opt in inner for group in opt.param_groups for p in group["params"]]
        return {"params": {n: p.detach().clone() for n, p in self.model.module.named_parameters()},
                "adam": adam,
                "lr": [g["lr"] for g in self.optimizer.param_groups],
                "scheduler_steps": self.scheduler.num_steps}


@pytest.fixture
def runs():
    yield Run
    destroy_model_parallel()


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(actual["params"][name], value), f"parameter {name} differs"
    assert len(actual["adam"]) == len(expected["adam"]) > 0
    for i, ((main, state), (main_ref, state_ref)) in enumerate(zip(actual["adam"], expected["adam"])):
        assert torch.equal(main, main_ref), f"main parameter shard {i} differs"
        assert state.keys() == state_ref.keys() == {"exp_avg", "exp_avg_sq", "step"}
        for key in state_ref:
            assert torch.equal(state[key], state_ref[key]), f"Adam {key} of shard {i} differs"
    assert actual["lr"] == expected["lr"]
    assert actual["scheduler_steps"] == expected["scheduler_steps"]


def draw_from_every_generator() -> tuple:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return random.random(), float(np.random.random()), torch.rand(4), tracker


def assert_same_draws(actual: tuple, expected: tuple) -> None:
    assert actual[:2] == expected[:2], "python / numpy generators not restored"
    assert torch.equal(actual[2], expected[2]), "torch CPU generator not restored"
    assert torch.equal(actual[3], expected[3]), "tensor-parallel RNG tracker not restored"


@pytest.mark.parametrize("layout", [dict(tp=2), dict(tp=1), dict(ep=2)], ids=["tp2", "dp2", "ep2-dp2"])
def test_resume_continues_bit_for_bit(runs, shared_tmp, layout):
    root = shared_tmp / "checkpoints"
    state = TrainerState(step=2, weight_version="v2", data_cursor={"epoch": 0, "position": 8},
                         extra={"best_reward": 0.25})
    run = runs(ParallelConfig(**layout), seed=1)
    for _ in range(2):
        run.train_step()
    path = save_checkpoint(root, state, run.model, run.optimizer, run.scheduler, run_config_text=RUN_CONFIG,
                           hf_config=TINY_QWEN3_MOE)
    saved, draws_after_save = run.snapshot(), draw_from_every_generator()
    losses = [run.train_step() for _ in range(2)]
    final = run.snapshot()
    destroy_model_parallel()

    fresh = runs(ParallelConfig(**layout), seed=7)  # other initial weights and generator states
    assert not torch.equal(next(fresh.model.parameters()), next(run.model.parameters()))
    assert find_latest(root) == path and path.name == "step_00000002"
    assert load_checkpoint(path, fresh.model, fresh.optimizer, fresh.scheduler) == state
    assert_same_state(fresh.snapshot(), saved)
    assert_same_draws(draw_from_every_generator(), draws_after_save)
    assert [fresh.train_step() for _ in range(2)] == losses
    assert_same_state(fresh.snapshot(), final)
    assert (path / checkpoint.RUN_CONFIG_FILE).read_text() == RUN_CONFIG
    assert sorted(p.name for p in (path / checkpoint.RNG_DIR).iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_other_layout_is_refused_but_weights_load(runs, shared_tmp):
    root = shared_tmp / "checkpoints"
    run = runs(ParallelConfig(tp=2), seed=1)
    run.train_step()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    logits_tp2 = all_gather_cat(forward_logits(run.model.module, tokens, run.pg), run.pg.tp, dim=-1)
    logits_tp2 = logits_tp2[..., :VOCAB]
    path = save_checkpoint(root, TrainerState(step=1), run.model, run.optimizer, run.scheduler,
                           hf_config=TINY_QWEN3_MOE)
    destroy_model_parallel()

    other = runs(ParallelConfig(tp=1), seed=7)
    differ = r"different parallel layout \(TP 2 -> 1, ETP 2 -> 1, DP 1 -> 2\)"
    with pytest.raises(CheckpointError, match=differ):
        load_checkpoint(path, other.model, other.optimizer, other.scheduler)
    # The weights alone are layout-free: they load at TP=1 and give the TP=2 logits.
    assert read_hf_config(path / checkpoint.MODEL_DIR) == TINY_QWEN3_MOE
    load_model(other.model.module, path / checkpoint.MODEL_DIR)
    logits_tp1 = forward_logits(other.model.module, tokens, other.pg)[..., :VOCAB]
    assert (logits_tp1 - logits_tp2).abs().max().item() <= 1e-5


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_in", ["publish", "_write_pointer"],
                         ids=["before-rename", "after-rename-before-pointer"])
def test_crash_leaves_previous_checkpoint_latest(runs, shared_tmp, monkeypatch, crash_in):
    root = shared_tmp / "checkpoints"
    run = runs(ParallelConfig(tp=1), seed=1)
    run.train_step()
    first = save_checkpoint(root, TrainerState(step=1), run.model, run.optimizer, run.scheduler)
    run.train_step()

    def crash(*args):
        raise SimulatedCrash(f"crash in {crash_in}")

    monkeypatch.setattr(checkpoint, crash_in, crash)  # rank 0 does the renames; the others learn it failed
    with pytest.raises((SimulatedCrash, CheckpointError), match="crash in"):
        save_checkpoint(root, TrainerState(step=2), run.model, run.optimizer, run.scheduler)
    monkeypatch.undo()
    leftover = root / (".step_00000002.partial" if crash_in == "publish" else "step_00000002")
    assert (leftover / checkpoint.OPTIMIZER_DIR / "metadata.json").is_file()
    assert find_latest(root) == first
    assert (root / "latest").read_text() == "step_00000001\n"
    dist.barrier()  # every rank has looked before the next save replaces the leftover

    second = save_checkpoint(root, TrainerState(step=2, extra={"retry": True}), run.model, run.optimizer,
                             run.scheduler)
    assert find_latest(root) == second
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert json.loads((second / checkpoint.TRAINER_STATE_FILE).read_text())["extra"] == {"retry": True}


def test_keep_last_prunes_older_checkpoints(runs, shared_tmp):
    root = shared_tmp / "checkpoints"
    run = runs(ParallelConfig(tp=1), seed=1)
    run.train_step()
    for step in range(1, 5):
        save_checkpoint(root, TrainerState(step=step), run.model, run.optimizer, run.scheduler, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert find_latest(root) == root / "step_00000004"
    with pytest.raises((FileExistsError, CheckpointError), match="is the latest checkpoint"):
        save_checkpoint(root, TrainerState(step=4), run.model, run.optimizer, run.scheduler)
    assert find_latest(root) == root / "step_00000004"
    with pytest.raises(ValueError, match="already taken 1 steps; load into a fresh one"):
        load_checkpoint(find_latest(root), run.model, run.optimizer, run.scheduler)


def test_clear_errors(runs, shared_tmp):
    root = shared_tmp / "checkpoints"
    assert find_latest(root) is None
    dist.barrier()  # every rank has looked before rank 0 writes
    if dist.get_rank() == 0:
        (root / "step_00000003").mkdir(parents=True)
        (root / "latest").write_text("step_00000005\n")
    dist.barrier()
    with pytest.raises(CheckpointError, match="names step_00000005, but .* is missing or incomplete"):
        find_latest(root)
    run = runs(ParallelConfig(tp=1), seed=1)
    with pytest.raises(FileNotFoundError, match="step_00000005 does not exist"):
        load_checkpoint(root / "step_00000005", run.model, run.optimizer, run.scheduler)
    with pytest.raises(CheckpointError, match="has no trainer_state.json"):
        load_checkpoint(root / "step_00000003", run.model, run.optimizer, run.scheduler)
    with pytest.raises(CheckpointError, match="is a checkpoints folder, not a checkpoint"):
        load_checkpoint(root, run.model, run.optimizer, run.scheduler)
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
        save_checkpoint(root, TrainerState(step=1), run.model, run.optimizer, run.scheduler, keep_last=0)
    with pytest.raises(ValueError, match="data_cursor is not JSON-serialisable"):
        save_checkpoint(root, TrainerState(step=1, data_cursor={"t": torch.ones(1)}), run.model,
                        run.optimizer, run.scheduler)
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest").write_text("../elsewhere\n")
    dist.barrier()
    with pytest.raises(CheckpointError, match="not a checkpoint folder name"):
        find_latest(root)


def test_policy_starts_from_load_dir(runs, shared_tmp):
    """checkpoint.load_dir: the policy gets the checkpoint's weights, not model.hf_dir's."""
    from megatron_sapo.config_file import load_config
    from megatron_sapo.models.tiny import save_tiny_qwen3_moe
    from megatron_sapo.training.setup import build_policy

    run = runs(ParallelConfig(tp=2), seed=3)
    run.train_step()
    trained = run.snapshot()["params"]
    save_checkpoint(shared_tmp / "checkpoints", TrainerState(step=1), run.model, run.optimizer, run.scheduler,
                    hf_config=TINY_QWEN3_MOE)
    destroy_model_parallel()
    if dist.get_rank() == 0:
        save_tiny_qwen3_moe(shared_tmp / "hf")
        (shared_tmp / "run.toml").write_text(
            f'[model]\nhf_dir = "{shared_tmp / "hf"}"\nparams_dtype = "fp32"\n[parallel]\ntp = 2\n'
            f'[data]\ntask = "tiny-reverse"\n[checkpoint]\nload_dir = "{shared_tmp / "checkpoints"}"\n')
    dist.barrier()
    cfg = load_config(shared_tmp / "run.toml")
    pg = initialize_model_parallel(cfg.parallel, seed=0)
    policy = build_policy(cfg, shared_tmp / "hf", pg, total_steps=1, load_dir=cfg.checkpoint.load_dir)
    loaded = dict(policy.module.named_parameters())
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), f"parameter {name} is not the checkpoint's"
