"""Old log-probs and one minibatch update on 2 gloo ranks, against transformers in one process.

The reference is the transformers model on the whole minibatch: log-softmax of its logits at
the sampling temperature, the same ``policy_loss`` with the full batch's own normaliser (or the
token-mean NLL), backward, gradient clipping and one torch AdamW step. Megatron runs the same
minibatch at TP=2 (sequence parallel, odd sequence length padded), EP=2, DP=2 and PP=2, split
into several microbatches per rank, and must reproduce per-token log-probs, loss, metrics,
gradient norm and every updated weight (gathered to Hugging Face tensors).

Tolerances (fp32): 1e-5 absolute on log-probs, loss, metrics and weights, 1e-5 relative on the
gradient norm (measured differences are about 5e-7). Adam's first step moves a weight by
``lr * g / (|g| + eps)``; with ``lr = 1e-2`` and ``adam_eps = 1e-3`` the weights after the step
depend on the gradient's scale (a factor 2 moves many weights by more than 1e-3), while fp32
noise of the gradients stays far below the tolerance.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rank_files import shared_dir

from megatron_sapo import torchvision_compat
from megatron_sapo.algo import kl_penalty, policy_loss
from megatron_sapo.config import ConfigError, LossConfig, OptimizerConfig, ParallelConfig
from megatron_sapo.convert.export import iter_hf_tensors
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.models import qwen3_moe
from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer, current_lr
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import TrainBatch

VOCAB = TINY_QWEN3_MOE["vocab_size"]
TEMPERATURE = 0.7
TOL = 1e-5
# (prompt length, sequence length) per row; T = 11 is odd so that TP=2 with SP pads; row 4 has
# no response token, so with one row per microbatch one microbatch has nothing to learn from.
ROWS = [(3, 11), (2, 9), (4, 7), (5, 11), (6, 6), (3, 10), (6, 8), (2, 11)]
SEQ = 11
OPTIMIZER = OptimizerConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0)


def make_batch(seed: int = 0, rows=ROWS, with_lengths: bool = False) -> TrainBatch:
    """Right-padded rows of random tokens; the loss covers each row's response tokens.
    ``with_lengths``: the batch knows each row's real length (else every row counts as full)."""
    g = torch.Generator().manual_seed(seed)
    width = max(length for _, length in rows)
    tokens = torch.randint(1, VOCAB, (len(rows), width), generator=g)
    loss_mask = torch.zeros(len(rows), width)
    for row, (prompt, length) in enumerate(rows):
        tokens[row, length:] = 0
        loss_mask[row, prompt - 1:length - 1] = 1
    targets = torch.cat([tokens[:, 1:], torch.zeros(len(rows), 1, dtype=torch.long)], dim=1)
    advantages = torch.randn(len(rows), generator=g)
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, advantages=advantages,
                      rollout_logprobs=torch.zeros(len(rows), width),
                      lengths=torch.tensor([length for _, length in rows]) if with_lengths else None)


def hf_model(path: Path):
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def hf_logprobs(model, batch: TrainBatch, temperature: float):
    """``(logprobs, entropy)`` ``[B, T]`` of the targets, masked to the loss tokens."""
    logp_all = torch.log_softmax(model(batch.tokens).logits / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.loss_mask
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def with_old_logprobs(hf_dir: Path, batch: TrainBatch, seed: int = 1) -> TrainBatch:
    """``batch`` with behaviour log-probs a little off the current policy, so ratios spread."""
    with torch.no_grad():
        logp, _ = hf_logprobs(hf_model(hf_dir), batch, TEMPERATURE)
    noise = 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    batch.old_logprobs = (logp + noise) * batch.loss_mask
    return batch


def reference_step(hf_dir: Path, batch: TrainBatch, loss_cfg: LossConfig | None, opt: OptimizerConfig,
                   out_dir: Path, temperature: float = TEMPERATURE) -> dict:
    """The update in one process with transformers and torch AdamW; ``loss_cfg=None``: token NLL."""
    model = hf_model(hf_dir)
    logp, entropy = hf_logprobs(model, batch, temperature)
    mask = batch.loss_mask.bool()
    if loss_cfg is None:
        loss = -logp.sum() / mask.sum()
        metrics = {}
    else:
        loss, metrics = policy_loss(logp, batch.old_logprobs, batch.advantages, batch.loss_mask, loss_cfg,
                                    entropy=entropy)
        metrics["kl_old"] = kl_penalty(logp.detach(), batch.old_logprobs, mask, "k3")[mask].mean()
    metrics["entropy"] = entropy.detach()[mask].mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad or float("inf"))
    torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                      weight_decay=opt.weight_decay).step()
    if dist.get_rank() == 0:
        model.save_pretrained(out_dir)  # the Hub layout, as the Megatron weights are exported
    dist.barrier()
    return dict(logprobs=logp.detach(), loss=loss.item(), grad_norm=grad_norm.item(),
                metrics={k: v.item() for k, v in metrics.items()}, weights=out_dir)


class Layout:
    """The tiny model at one Megatron layout, loaded from the HF checkpoint; torn down after the test."""

    def __init__(self, hf_dir: Path, tp=1, ep=1, pp=1, recompute=False):
        self.parallel = ParallelConfig(tp=tp, ep=ep, pp=pp)
        self.pg = initialize_model_parallel(self.parallel)
        self.spec = qwen3_moe.from_hf_config(qwen3_moe.read_hf_config(hf_dir), self.parallel)
        if recompute:  # every layer's activations recomputed in backward
            config = dataclasses.replace(self.spec.config, recompute_granularity="full",
                                         recompute_method="uniform", recompute_num_layers=1)
            self.spec = dataclasses.replace(self.spec, config=config)
        self.table = qwen3_moe.weight_table(self.spec)
        self.module = qwen3_moe.build_model(self.spec, self.pg, pp_rank=dist.get_rank(self.pg.pp))
        load_hf_into_model(self.module, HFCheckpoint(hf_dir), self.table, self.pg)

    def rows(self, batch: TrainBatch) -> slice:
        """This data-parallel rank's rows of the minibatch."""
        share = batch.batch_size // dist.get_world_size(self.pg.dp)
        start = dist.get_rank(self.pg.dp) * share
        return slice(start, start + share)

    def hf_weights(self, world) -> dict[str, torch.Tensor]:
        """Every weight as Hugging Face tensors, on every rank (collective)."""
        owned = dict(iter_hf_tensors(self.module, self.table, self.pg))
        parts = [None] * dist.get_world_size(world)
        dist.all_gather_object(parts, owned, group=world)
        return {name: tensor for part in parts for name, tensor in part.items()}


@pytest.fixture
def layouts():
    yield Layout
    destroy_model_parallel()


def worst_over_ranks(value: torch.Tensor, world) -> float:
    """The largest ``value`` over all ranks, so every rank passes or fails an assertion together
    (a rank failing alone would leave the others waiting in the next collective)."""
    value = value.detach().to(torch.float64).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=world)
    return value.item()


def assert_same_weights(megatron: dict[str, torch.Tensor], reference_dir: Path) -> None:
    reference = HFCheckpoint(reference_dir)
    assert sorted(megatron) == sorted(reference.names())
    worst = max((megatron[name] - reference.get(name)).abs().max().item() for name in megatron)
    assert worst <= TOL, f"weights after the step differ by up to {worst:.2e}"


def assert_close(actual: float, expected: float, what: str, rel: bool = False) -> None:
    scale = abs(expected) if rel else 1.0
    assert abs(actual - expected) <= TOL * scale, f"{what}: {actual} vs reference {expected}"


def assert_step_matches(metrics, reference: dict, rows=ROWS) -> None:
    assert_close(metrics.loss, reference["loss"], "loss")
    assert_close(metrics.grad_norm, reference["grad_norm"], "grad_norm", rel=True)
    for key, expected in reference["metrics"].items():
        assert_close(getattr(metrics, key), expected, key)
    assert metrics.tokens == sum(length - prompt for prompt, length in rows)


LOSSES = {
    "sapo": LossConfig(name="sapo"),
    "gspo": LossConfig(name="gspo"),
    "grpo-dual-clip": LossConfig(name="grpo", dual_clip_c=3.0),
}


@pytest.mark.parametrize("layout, loss_name", [
    (dict(tp=2), "sapo"), (dict(ep=2), "sapo"), (dict(), "gspo"), (dict(pp=2), "grpo-dual-clip"),
], ids=["tp2-sp-sapo", "ep2-dp2-sapo", "dp2-gspo", "pp2-grpo"])
def test_update_matches_transformers(layouts, tiny_hf, tmp_path_factory, world, layout, loss_name):
    loss_cfg = LOSSES[loss_name]
    batch = with_old_logprobs(tiny_hf, make_batch())
    reference = reference_step(tiny_hf, batch, loss_cfg, OPTIMIZER, shared_dir(tmp_path_factory, "reference"))
    run = layouts(tiny_hf, **layout)
    rows = run.rows(batch)
    mine = batch.select(rows)

    logprobs = compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                                true_vocab_size=VOCAB)
    assert worst_over_ranks((logprobs - reference["logprobs"][rows]).abs().max(), world) <= TOL
    assert worst_over_ranks(logprobs[mine.loss_mask == 0].abs().max(), world) == 0

    model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
    metrics = train_minibatch(model, optimizer, scheduler, mine, loss_cfg, run.pg, batching=Batching(2),
                              temperature=TEMPERATURE, true_vocab_size=VOCAB)
    assert_step_matches(metrics, reference)
    assert metrics.lr == OPTIMIZER.lr
    assert_same_weights(run.hf_weights(world), reference["weights"])


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_microbatch_split_does_not_change_the_update(layouts, tiny_hf, tmp_path_factory, world, agg):
    """DP=2, 4 rows per rank: one microbatch of 4 rows and four of 1 row (one of them without loss
    tokens) both give the full minibatch's update, thanks to the global normaliser."""
    loss_cfg = LossConfig(name="sapo", agg=agg)
    opt = OptimizerConfig(lr=1e-2, adam_eps=1e-3, clip_grad=0.0)  # unclipped: weights show the gradient scale
    batch = with_old_logprobs(tiny_hf, make_batch(seed=2), seed=3)
    reference = reference_step(tiny_hf, batch, loss_cfg, opt, shared_dir(tmp_path_factory, "reference"))
    results = {}
    for micro_batch_size in (4, 1):
        run = layouts(tiny_hf)
        model, optimizer, scheduler = build_optimizer(run.module, opt, run.pg, total_steps=1)
        results[micro_batch_size] = train_minibatch(
            model, optimizer, scheduler, batch.select(run.rows(batch)), loss_cfg, run.pg,
            batching=Batching(micro_batch_size), temperature=TEMPERATURE, true_vocab_size=VOCAB)
        assert_step_matches(results[micro_batch_size], reference)
        assert_same_weights(run.hf_weights(world), reference["weights"])
        destroy_model_parallel()
    assert abs(results[4].grad_norm - results[1].grad_norm) <= TOL * results[4].grad_norm


def test_learning_rate_warms_up_then_decays(layouts, tiny_hf):
    run = layouts(tiny_hf)
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, lr_decay_style="linear")
    _, optimizer, scheduler = build_optimizer(run.module, cfg, run.pg, total_steps=6)
    rates = [current_lr(optimizer)]
    for _ in range(6):
        scheduler.step(1)
        rates.append(current_lr(optimizer))
    # Linear warm-up from 0 over 2 steps, then linear decay to min_lr at step 6.
    expected = [0.0, 5e-4, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4]
    assert rates == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_optimizer(run.module, cfg, run.pg, total_steps=2)


def test_compute_logprobs_is_the_same_at_pp2(layouts, tiny_hf, world):
    batch = make_batch(seed=5)
    run = layouts(tiny_hf)  # PP=1, DP=2: each rank its half, then gathered
    rows = run.rows(batch)
    half = compute_logprobs(run.module, batch.select(rows), run.pg, batching=Batching(1),
                            temperature=TEMPERATURE, true_vocab_size=VOCAB)
    single = all_gather_cat(half, run.pg.dp, dim=0)
    destroy_model_parallel()
    run = layouts(tiny_hf, pp=2)
    pipelined = compute_logprobs(run.module, batch, run.pg, batching=Batching(1), temperature=TEMPERATURE,
                                 true_vocab_size=VOCAB)
    assert worst_over_ranks((pipelined - single).abs().max(), world) == 0


def test_bad_inputs_name_what_is_wrong(layouts, tiny_hf):
    run = layouts(tiny_hf)
    mine = make_batch().select(run.rows(make_batch()))
    with pytest.raises(ValueError, match="a row of 11 tokens .* exceeds train.max_tokens_per_microbatch = 10"):
        compute_logprobs(run.module, mine, run.pg, batching=Batching(max_tokens=10), temperature=1.0,
                         true_vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="total_steps"):
        build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=0)
    model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
    step = dict(batching=Batching(2), temperature=1.0, true_vocab_size=VOCAB)
    with pytest.raises(ValueError, match="old_logprobs"):
        train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, **step)
    mine.old_logprobs = torch.zeros(mine.tokens.shape)
    mine.loss_mask = torch.zeros(mine.tokens.shape)  # every row out of the loss: no update at all
    before = [p.detach().clone() for p in model.parameters()]
    skipped = train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, **step)
    assert (skipped.microbatches, skipped.tokens, skipped.grad_norm) == (0.0, 0.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
