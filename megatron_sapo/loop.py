"""The RL loop: one step per rollout batch, in the paper's order.

    prompts -> rollout (G samples each, SGLang) -> rewards -> group advantages
    -> each data-parallel replica receives its own rows
    -> old log-probs on those rows (Megatron forward; routes recorded for R2)
    -> rollout correction weights (loss.rollout_correction)
    -> k minibatch updates with the policy loss (SAPO | GRPO | GSPO)
    -> weight sync to SGLang -> metrics -> evaluation -> checkpoint

With ``rollout.max_staleness = k >= 1`` the servers generate the next steps' groups while the
trainer trains, from weights at most ``k`` syncs old (``rollout/pipeline.py``).

A stop signal (SIGTERM, SIGUSR1) or the file OUTPUT/STOP ends the run after the step under
way, with a checkpoint.

Every rank runs :func:`train`. Rank 0 also runs the rollout side (servers, client, prompt
order, rewards) and sends each data-parallel replica its share of the step's rows
(``training/shard.py``); every rank then trains its part of the model on its replica's rows,
and step metrics are reduced over the replicas so they describe the whole step. A run is
reproducible: prompts follow a seeded order, each sample has its own sampling
seed derived from (seed, step, prompt, sample), and checkpoints hold every RNG state, so a run
resumed from step N continues exactly like a run that never stopped.
"""

from __future__ import annotations

import io
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_sapo import run_diagnostics
from megatron_sapo.algo import group_advantages
from megatron_sapo.algo.correction import correction_metrics, correction_sums, rollout_correction
from megatron_sapo.algo.diagnostics import gate_records
from megatron_sapo.config import SERVED_DTYPES, RunConfig
from megatron_sapo.config_file import dump_config
from megatron_sapo.data.rewards import RewardScores
from megatron_sapo.eval_sets import LoadedSet, evaluate_set, load_sets
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.rollout.client import RolloutClient, RoutedExperts, SamplingParams
from megatron_sapo.rollout.manager import RemoteServers, ServerManager
from megatron_sapo.rollout.pipeline import STATE_FILE, RolloutPipeline, sample_seed, staleness, version_step
from megatron_sapo.rollout.weight_sync import ServerEndpoint, WeightSync
from megatron_sapo.parallel.collectives import comm_device
from megatron_sapo.training.batch import build_train_batch, compact_routes, image_layout
from megatron_sapo.training.checkpoint import TrainerState, find_latest, load_checkpoint, save_checkpoint
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.routing_replay import RoutingReplay
from megatron_sapo.training.setup import Policy, build_policy, prepare_start_model
from megatron_sapo.training.shard import ReplicaRows, replica_shares, scatter_rows
from megatron_sapo.training.stop import STOP_FILE, Stopped, StopRequest
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import Group, Prompt, TrainBatch

if TYPE_CHECKING:  # annotations only
    from megatron.core.process_groups_config import ProcessGroupCollection
    from transformers import PreTrainedTokenizerBase

    from megatron_sapo.data.datasets import PromptSampler
    from megatron_sapo.data.remote_reward import RemoteRewardScorer
    from megatron_sapo.data.rewards import RewardScorer
    from megatron_sapo.run_log import RunLog


@dataclass
class Rollout:
    """Rank 0's side of the run."""

    client: RolloutClient
    pipeline: RolloutPipeline
    val_prompts: list[Prompt]
    sampler: PromptSampler
    scorer: RewardScorer | RemoteRewardScorer
    manager: ServerManager | RemoteServers
    """The colocated servers this run started, or the disaggregated ones it waits for."""
    log: RunLog
    tokenizer: PreTrainedTokenizerBase
    eval_sets: list[LoadedSet]
    reward_failure_reported: bool = False
    """Whether the run's first failed reward call has been printed."""


@dataclass
class Run:
    cfg: RunConfig
    out_dir: Path
    pg: ProcessGroupCollection
    policy: Policy
    routing: RoutingReplay | None
    sync: WeightSync
    rollout: Rollout | None
    """Only on rank 0."""
    replica_of_rank: list[int]
    """The data-parallel rank of each world rank."""
    device: torch.device
    """Where the model (and so each step's batch) lives."""
    pad_id: int
    """The tokenizer's padding token."""
    step: int = 0
    step_started: float = 0.0
    """``time.perf_counter()`` when the step under way began."""
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[f"time_{stage}_s"] = time.perf_counter() - start


# ---- one RL step ------------------------------------------------------------------------------

def rl_step(run: Run) -> dict[str, float]:
    cfg, step = run.cfg, run.step
    with run.timed("rollout"):
        groups = rollout_groups(run, step)
    with run.timed("reward"):
        groups, sampled_metrics = score_groups(run, step, groups) if run.rollout else (None, {})
        batch, minibatch_rows = receive_rows(run, groups)
    release = cfg.rollout.release_memory_during_train and run.rollout is not None
    if release:
        run.rollout.client.release_memory()
    with run.timed("old_logprobs"):
        if cfg.loss.behavior_logprobs == "rollout":
            batch.old_logprobs = batch.rollout_logprobs
        else:
            batch.old_logprobs = old_logprobs(run, batch)
        if cfg.train.records_routes:
            batch.routes = run.routing.recorded
    behaviour_metrics = correct_rollout(run, batch)
    update_metrics = []
    with run.timed("train"):
        for minibatch in minibatches(batch, minibatch_rows):
            update_metrics.append(train_minibatch(
                *run.policy.trainable, minibatch, cfg.loss, run.pg, batching=Batching.of(cfg.train),
                temperature=cfg.rollout.temperature, true_vocab_size=run.policy.spec.vocab_size,
                routing=run.routing if batch.routes is not None else None))
    if release:
        run.rollout.client.resume_memory(("weights",))
    with run.timed("weight_sync"):
        sync_weights(run, step)
    if release:
        run.rollout.client.resume_memory(("kv_cache",))
    metrics = {**sampled_metrics, **mean_metrics([m.as_dict() for m in update_metrics]), **behaviour_metrics,
               "train_token_util": sum(m.real_tokens for m in update_metrics)
               / max(sum(m.processed_tokens for m in update_metrics), 1.0),
               "updates_skipped": float(sum(m.microbatches == 0 for m in update_metrics)),
               **replica_load(batch, run.pg)}
    clipped = [metrics[k] for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual") if k in metrics]
    if clipped:
        metrics["clip_frac"] = sum(clipped)
    # One agreement metric: the first update's, which runs the policy the routes came from
    # (later updates have moved it, so their agreement says less).
    metrics.pop("routing_agreement", None)
    if update_metrics[0].routing_agreement is not None:
        metrics["replay_agreement"] = update_metrics[0].routing_agreement
    if cfg.logging.histogram_every and step % cfg.logging.histogram_every == 0:
        histograms(run, batch)
    return metrics


def rollout_groups(run: Run, step: int) -> list[Group] | None:
    """This step's groups on rank 0 (None elsewhere), every sample within the staleness bound
    (collective). A server that died and was restarted serves its start weights: its samples are
    sampled again once every server holds the current ones."""
    groups = run.rollout.pipeline.groups(step) if run.rollout else None
    while True:
        stale = None
        if run.rollout:
            stale = [(g, s) for g, group in enumerate(groups) for s, sample in enumerate(group.samples)
                     if staleness(sample, step) > run.cfg.rollout.max_staleness]
        count = [len(stale) if stale is not None else None]
        dist.broadcast_object_list(count, src=0)
        if not count[0]:
            return groups
        if run.rollout:
            print(f"step {step}: {count[0]} samples came from weights older than rollout.max_staleness allows "
                  "(a restarted server); syncing the current weights and sampling them again", file=sys.stderr,
                  flush=True)
        sync_weights(run, step - 1)
        if run.rollout:
            run.rollout.pipeline.resample(step, groups, stale)


def sync_weights(run: Run, version: int) -> None:
    """Collective: the trainer's weights, as version ``version``, to every server (rank 0 restarts
    a dead colocated server, and lets generation in flight finish or pauses it first,
    ``rollout.partial``)."""
    if run.rollout:
        # A colocated server that died meanwhile is restarted, a disaggregated one waited for, to be synced too.
        for url in run.rollout.client.urls:
            run.rollout.manager.ensure_alive(url)
        run.rollout.pipeline.before_sync()
    run.sync.sync(version=f"step-{version}")
    if run.rollout:
        run.rollout.pipeline.after_sync(version)


def score_groups(run: Run, step: int, groups: list[Group]) -> tuple[list[Group], dict[str, float]]:
    """Rank 0: the groups to train on, scored, and the step's rollout metrics. With
    ``rollout.filter_groups = "nonzero_std"`` (dynamic sampling) groups whose rewards are all
    equal are dropped and more prompts sampled, round after round, until ``prompts_per_step``
    groups remain or ``max_sampling_rounds`` is reached; dropped groups then fill the batch and
    leave the loss. Reward metrics describe every group sampled."""
    cfg = run.cfg.rollout
    scores = [score(run, groups)]
    if cfg.filter_groups == "none":
        return groups, rollout_metrics(run, groups, scores)
    sampled, rounds = list(groups), 1
    useful = [g for g in groups if has_spread(g)]
    while len(useful) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
        rounds += 1
        more = run.rollout.pipeline.more_groups(step, rounds)
        scores.append(score(run, more))
        sampled += more
        useful += [g for g in more if has_spread(g)]
    kept = useful[:cfg.prompts_per_step]
    fill = [g for g in sampled if not has_spread(g)][:cfg.prompts_per_step - len(kept)]
    for sample in (s for g in fill for s in g.samples):
        sample.in_loss = False
    metrics = rollout_metrics(run, sampled, scores)
    metrics.update(groups_filtered_frac=1 - len(useful) / len(sampled), sampling_rounds=float(rounds))
    return kept + fill, metrics


def has_spread(group: Group) -> bool:
    """Whether the group's rewards differ (else every advantage is 0: nothing to learn)."""
    return len(set(group.rewards)) > 1


def score(run: Run, groups: list[Group]):
    """Rank 0: decode the responses, score them and store each sample's reward (the verifier's
    score less the overlong penalty); the verifier's scores and counts."""
    rollout = run.rollout
    samples = [s for g in groups for s in g.samples]
    for sample in samples:
        sample.response_text = rollout.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    answers = [g.prompt.answer for g in groups for _ in g.samples]
    scores = rollout.scorer.score([s.response_text for s in samples], answers,
                                  [g.prompt.fields for g in groups for _ in g.samples])
    report_reward_failure(run, scores)
    for sample, value in zip(samples, scores.scores):
        sample.reward = value - overlong_penalty(len(sample.response_ids), run.cfg.rollout)
    return scores


def rollout_metrics(run: Run, groups: list[Group], scores: list) -> dict[str, float]:
    """Rewards, lengths, failures and staleness of the step's sampled groups."""
    rollout = run.rollout
    samples = [s for g in groups for s in g.samples]
    verifier = RewardScores.merged(scores)
    rewards = torch.tensor([s.reward for s in samples])
    lengths = torch.tensor([float(len(s.response_ids)) for s in samples])
    verifier_mean = sum(verifier.scores) / len(verifier.scores)
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            "reward_errors": verifier.errors, "reward_timeouts": verifier.timeouts, **verifier.extra_means(),
            **({"reward_verifier_mean": verifier_mean, "overlong_penalty_mean": verifier_mean - rewards.mean().item()}
               if run.cfg.rollout.overlong_buffer else {}),
            "response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
            "response_truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "rollout_retries": rollout.client.retries, "rollout_sync_interrupted": rollout.client.sync_interrupted,
            **staleness_metrics(samples, run.step), **generation_timing(run)}


def generation_timing(run: Run) -> dict[str, float]:
    """When this step's groups were generated, against the step (negative start: during earlier
    steps), and the fraction of that time the trainer did not wait for (hidden behind training)."""
    span = run.rollout.pipeline.spans.pop(run.step, None)
    if span is None:  # generated before a resume
        return {}
    generation = max(span[1] - span[0], 1e-9)
    return {"time_generation_s": generation, "time_generation_start_s": span[0] - run.step_started,
            "rollout_hidden_frac": min(max(1.0 - run.timings["time_rollout_s"] / generation, 0.0), 1.0)}


def overlong_penalty(length: int, rollout) -> float:
    """DAPO's soft overlong penalty of a response of ``length`` tokens (``rollout.overlong_buffer``)."""
    buffer = rollout.overlong_buffer
    start = rollout.max_new_tokens - buffer
    if not buffer or length <= start:
        return 0.0
    return rollout.overlong_penalty * min(length - start, buffer) / buffer


def report_reward_failure(run: Run, scores) -> None:
    """The run's first failed reward call, with its traceback, once, on stderr and in
    ``logs/reward_failure.txt`` (later ones are counted in ``reward_errors`` / ``reward_timeouts``)."""
    if scores.first_error is None or run.rollout.reward_failure_reported:
        return
    run.rollout.reward_failure_reported = True
    report = (f"step {run.step}: a call of the reward function {run.rollout.scorer.name} failed and scored 0 "
              f"(later failures are only counted: reward_errors, reward_timeouts):\n{scores.first_error}")
    print(report, file=sys.stderr, flush=True)
    (run.out_dir / "logs").mkdir(exist_ok=True)
    (run.out_dir / "logs" / "reward_failure.txt").write_text(report + "\n")


def staleness_metrics(samples: list, step: int) -> dict[str, float]:
    """How many weight versions the samples lag the policy this step trains (the oldest token's
    version for a sample continued across a sync), and the oldest version that sampled any."""
    ages = [staleness(s, step) for s in samples]
    return {"rollout_staleness_mean": sum(ages) / len(ages), "rollout_staleness_max": float(max(ages)),
            "rollout_weight_step": float(min(version_step(s.weight_version) for s in samples))}


def replica_rows(run: Run, groups: list[Group]) -> list[ReplicaRows]:
    """Rank 0: group-normalised advantages (paper eq. 2), then every replica's share of the
    rows (with each row's images for a vision-language model, and its routes for R3 in the
    smallest type that holds them)."""
    cfg = run.cfg
    rewards = torch.tensor([g.rewards for g in groups])
    advantages = group_advantages(rewards).flatten().tolist()
    samples = [s for g in groups for s in g.samples]
    if cfg.train.routes_from_rollout:
        for sample in samples:
            sample.routed_experts = compact_routes(sample.routed_experts, run.policy.spec.config.num_moe_experts).numpy()
    vision = [g.prompt.vision for g in groups for _ in g.samples] if image_layout(run.policy.spec) else None
    return replica_shares(samples, advantages, vision, cfg.train.minibatches, run.pg.dp.size(),
                          balance=cfg.train.max_tokens_per_microbatch > 0)


def receive_rows(run: Run, groups: list[Group] | None) -> tuple[TrainBatch, list[int]]:
    """This replica's rows as a padded batch on the model's device, and the rows of each
    minibatch (collective over the world)."""
    mine = scatter_rows(replica_rows(run, groups) if run.rollout else None, run.replica_of_rank)
    batch = build_train_batch(mine.samples, mine.advantages, run.pad_id,
                              with_routes=run.cfg.train.routes_from_rollout,
                              num_experts=run.policy.spec.config.num_moe_experts, vision=mine.vision,
                              layout=image_layout(run.policy.spec))
    batch.loss_mask[out_of_loss(mine.samples, run.cfg.loss.mask_truncated)] = 0.0
    return batch.to(run.device), mine.minibatch_rows


def out_of_loss(samples: list, mask_truncated: bool) -> torch.Tensor:
    """bool ``[rows]``: samples that leave the loss and its normaliser: those that only fill the
    batch (dynamic sampling ran out of rounds) and, under ``loss.mask_truncated``, responses cut
    at ``rollout.max_new_tokens``."""
    return torch.tensor([not s.in_loss or (mask_truncated and s.finish_reason == "length") for s in samples],
                        dtype=torch.bool)


def old_logprobs(run: Run, batch: TrainBatch) -> torch.Tensor:
    """Log-probs of the policy before this step's updates on this replica's rows (routes
    recorded under R2)."""
    return compute_logprobs(run.policy.trainable.model, batch, run.pg, batching=Batching.of(run.cfg.train),
                            temperature=run.cfg.rollout.temperature, true_vocab_size=run.policy.spec.vocab_size,
                            routing=run.routing if run.cfg.train.replays_routes else None)


def minibatches(batch: TrainBatch, minibatch_rows: list[int]) -> list[TrainBatch]:
    """This replica's rows of each minibatch (consecutive in its batch)."""
    starts = [sum(minibatch_rows[:m]) for m in range(len(minibatch_rows))]
    return [batch.select(slice(start, start + rows)) for start, rows in zip(starts, minibatch_rows)]


def mean_metrics(per_minibatch: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in per_minibatch for k in m}
    return {k: sum(m[k] for m in per_minibatch if k in m) / sum(k in m for m in per_minibatch) for k in keys}


def correct_rollout(run: Run, batch: TrainBatch) -> dict[str, float]:
    """The rollout correction on this replica's rows (``loss.rollout_correction``: token weights,
    and tokens or sequences leaving the loss and its normaliser), and the step's train/rollout
    metrics over all replicas: mean |old - rollout| log-prob, k3 KL, and what the correction did.
    None of this exists with ``loss.behavior_logprobs = "rollout"`` (the two are the same)."""
    loss = run.cfg.loss
    if loss.behavior_logprobs == "rollout":
        return {}
    correction = rollout_correction(batch.old_logprobs, batch.rollout_logprobs, batch.loss_mask,
                                    loss.rollout_correction, loss.rollout_correction_low,
                                    loss.rollout_correction_high, logratio_clamp=loss.logratio_clamp)
    mask = batch.loss_mask.bool()
    mismatch = torch.where(mask, (batch.old_logprobs - batch.rollout_logprobs).abs(), 0.0).sum()
    group = run.pg.dp_cp
    sums = torch.cat([correction_sums(correction, batch.old_logprobs, batch.rollout_logprobs, batch.loss_mask),
                      mismatch.reshape(1).to(torch.float64)]).to(comm_device(group))
    largest = sums[4].clone()
    dist.all_reduce(sums, group=group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    metrics = correction_metrics(sums[:4].cpu(), largest.item())
    metrics["logprob_mismatch"] = sums[5].item() / max(sums[2].item(), 1.0)
    if loss.rollout_correction == "none":
        return {key: metrics[key] for key in ("rollout_kl", "logprob_mismatch")}
    batch.token_weights = correction.weights
    batch.loss_mask = correction.keep.to(batch.loss_mask.dtype)
    return metrics


def replica_load(batch: TrainBatch, pg) -> dict[str, float]:
    """The busiest replica's share of the step: rows (the rows its old-log-prob pass ran) and
    tokens against the replicas' mean."""
    local = torch.tensor([batch.batch_size, sum(batch.row_lengths)], dtype=torch.float64,
                         device=comm_device(pg.dp_cp))
    most, total = local.clone(), local.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=pg.dp_cp)
    dist.all_reduce(total, group=pg.dp_cp)
    return {"replica_rows_max": most[0].item(),
            "replica_tokens_max_over_mean": most[1].item() * dist.get_world_size(pg.dp_cp) / total[1].item()}


def histograms(run: Run, batch: TrainBatch) -> None:
    """Token ratios after this step's updates against the old policy, ``Var_i``, ``D_i`` and its
    bound, and where the gate engaged (the paper's figures 2-3 for this run): exact counts and a
    bounded sample over every replica's rows, written to ``diagnostics/`` and TensorBoard
    (``run_diagnostics.py``)."""
    routing = run.routing if batch.routes is not None else None
    new = compute_logprobs(run.policy.trainable.model, batch, run.pg, batching=Batching.of(run.cfg.train),
                           temperature=run.cfg.rollout.temperature,
                           true_vocab_size=run.policy.spec.vocab_size, routing=routing)
    if dist.get_rank(run.pg.mp) != 0:  # rank 0's data-parallel group (TP and PP rank 0) reports
        return
    records = gate_records(new, batch.old_logprobs, batch.advantages, batch.loss_mask, run.cfg.loss)
    logging = run.cfg.logging
    step = run_diagnostics.collect(records, run.cfg.loss, run.step, seed=run.cfg.train.seed,
                                   tokens=logging.diagnostics_tokens, sequences=logging.diagnostics_sequences,
                                   group=run.pg.dp)
    if run.rollout is not None:
        step.save(run_diagnostics.step_file(run.out_dir, run.step))
        run.rollout.log.histograms(run.step, step.histograms())


# ---- evaluation -------------------------------------------------------------------------------

def evaluate(run: Run) -> dict[str, float]:
    """Rank 0: Pass@1 averaged over k samples per validation problem (avg@k), and every
    ``eval.sets`` set's avg@k and pass@k (``eval_sets.py``)."""
    metrics = {}
    for loaded in run.rollout.eval_sets:
        metrics.update(evaluate_set(loaded, run.rollout.pipeline.generate, run.rollout.tokenizer, run.cfg, run.step))
    return {**validation_pass_at_1(run), **metrics}


def validation_pass_at_1(run: Run) -> dict[str, float]:
    cfg, rollout = run.cfg, run.rollout
    problems = rollout.val_prompts[:cfg.eval.max_problems] if cfg.eval.max_problems else rollout.val_prompts
    if not problems:
        return {}
    k = cfg.eval.samples_per_problem
    seeds = [[sample_seed(cfg.rollout.sampling_seed, -1 - run.step, p.index, j) for j in range(k)] for p in problems]
    sampling = SamplingParams(temperature=cfg.eval.temperature,
                              max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    groups = rollout.pipeline.generate(problems, k, sampling, seeds, rid_prefix=f"eval{run.step}")
    responses = [rollout.tokenizer.decode(s.response_ids, skip_special_tokens=True) for g in groups for s in g.samples]
    scores = rollout.scorer.score(responses, [g.prompt.answer for g in groups for _ in g.samples],
                                  [g.prompt.fields for g in groups for _ in g.samples])
    report_reward_failure(run, scores)
    return {"pass_at_1": sum(scores.scores) / len(scores.scores), "eval_problems": len(problems)}


# ---- the run ----------------------------------------------------------------------------------

def train(cfg: RunConfig, out_dir: Path, *, resume: bool = False) -> Stopped | None:
    """Collective over all ranks (torch.distributed initialised): the whole run.

    Returns None when every step ran, or why the run stopped early (a signal, the stop file),
    after a checkpoint of the last finished step (``training/stop.py``)."""
    pg = initialize_model_parallel(cfg.parallel, seed=cfg.train.seed)
    stop_request = StopRequest(out_dir / STOP_FILE).install()
    run, stopped = None, None
    try:
        run = start(cfg, out_dir, pg, resume)
        progress, saved_step = _progress(run), run.step
        while run.step < cfg.train.steps:
            stopped = stop_request.agreed()
            if stopped is not None:
                break
            run.step += 1
            run.timings.clear()
            run.step_started = start_time = time.perf_counter()
            metrics = rl_step(run)
            if run.rollout and cfg.eval.every and (run.step % cfg.eval.every == 0 or run.step == cfg.train.steps):
                with run.timed("eval"):
                    metrics.update(evaluate(run))
            metrics.update(run.timings, time_step_s=time.perf_counter() - start_time)
            if run.rollout:
                metrics["tokens_per_s"] = metrics.get("tokens", 0.0) * cfg.train.minibatches / metrics["time_train_s"]
                run.rollout.log.scalars(run.step, metrics)
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")
            if _checkpoint_due(cfg, run.step):
                checkpoint(run)
                saved_step = run.step
        if stopped is not None and run.step != saved_step:
            checkpoint(run)
        if run.rollout:
            progress.close()
        return stopped
    except Exception as err:
        if stop_request.signum is None:
            raise
        # SLURM signals every process of a job step, so colocated servers stop with the trainer
        # (scancel, requeue): the step under way cannot finish.
        print(f"step {run.step if run else 0} did not finish after the stop signal ({type(err).__name__}: {err})",
              file=sys.stderr, flush=True)
        return Stopped(stop_request.signum)
    finally:
        stop_request.restore()
        if run is not None:
            stop(run)
        destroy_model_parallel()


def _checkpoint_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.checkpoint.save_every
    return step == cfg.train.steps or bool(every and step % every == 0)


def _progress(run: Run):
    if not run.rollout:
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.train.steps, initial=run.step, desc="RL steps", unit="step", dynamic_ncols=True)


def start(cfg: RunConfig, out_dir: Path, pg, resume: bool) -> Run:
    rank = dist.get_rank()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(dump_config(cfg))
    holder = [str(prepare_start_model(cfg, out_dir)) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    start_model = Path(holder[0])
    latest = find_latest(out_dir / "checkpoints") if resume else None
    # A resumed run loads its own checkpoint below; a new one starts from checkpoint.load_dir if set.
    policy = build_policy(cfg, start_model, pg, total_steps=cfg.train.steps * cfg.train.minibatches,
                          load_dir=cfg.checkpoint.load_dir if latest is None else None)
    routing = RoutingReplay(policy.trainable.model, pg) if cfg.train.replays_routes else None

    state = load_checkpoint(latest, *policy.trainable) if latest else TrainerState(step=0, weight_version=None,
                                                                                  data_cursor={}, extra={})
    rollout = start_rollout(cfg, out_dir, start_model, policy, state) if rank == 0 else None
    shared = [(rollout.client.urls, rollout.tokenizer.pad_token_id) if rollout else None]
    dist.broadcast_object_list(shared, src=0)
    urls, pad_id = shared[0]
    sync = WeightSync(policy.module, policy.table, pg, [ServerEndpoint(u, cfg.rollout.server_tp) for u in urls],
                      path=cfg.rollout.weight_sync, bucket_bytes=cfg.rollout.bucket_mb * 2**20,
                      hf_config=policy.hf_config, disk_dir=out_dir / "weight_sync_hf",
                      timeout_s=cfg.rollout.request_timeout_s)
    replica_of_rank = [None] * dist.get_world_size()
    dist.all_gather_object(replica_of_rank, dist.get_rank(pg.dp))
    run = Run(cfg=cfg, out_dir=out_dir, pg=pg, policy=policy, routing=routing, sync=sync, rollout=rollout,
              replica_of_rank=replica_of_rank, device=next(policy.module.parameters()).device, pad_id=pad_id,
              step=state.step)
    # The servers start from the HF weights: a resumed run or a policy from checkpoint.load_dir
    # sends them its own before the first step.
    if latest is not None or cfg.checkpoint.load_dir is not None:
        sync.sync(version=state.weight_version or f"step-{state.step}")
    if rollout is not None and latest is not None and (latest / STATE_FILE).exists():
        rollout.pipeline.load_state_dict(torch.load(latest / STATE_FILE, weights_only=True))
    return run


def start_rollout(cfg: RunConfig, out_dir: Path, start_model: Path, policy: Policy, state: TrainerState) -> Rollout:
    """Rank 0: servers (colocated) or their addresses, client, prompts, sampler, scorer, log."""
    from megatron_sapo.data.chat import encode_records
    from megatron_sapo.data.checks import reward_name
    from megatron_sapo.data.datasets import PromptSampler, load_split
    from megatron_sapo.data.remote_reward import RemoteRewardScorer
    from megatron_sapo.data.rewards import RewardScorer
    from megatron_sapo.data.tasks import get_task
    from megatron_sapo.parallel.ports import free_port
    from megatron_sapo.rollout.server import ServerOptions
    from megatron_sapo.run_log import RunLog
    from megatron_sapo import torchvision_compat

    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start_model)
    # Vision-language models format image prompts with their processor (see data/chat.py).
    layout = image_layout(policy.spec)
    processor = AutoProcessor.from_pretrained(start_model) if layout else None
    if cfg.data.task:
        task = get_task(cfg.data.task)
        train_records, val_records = task.records("train", cfg.data.seed), task.records("val", cfg.data.seed)
    else:
        train_records = load_split(cfg.data, "train")
        val_records = load_split(cfg.data, "val") if cfg.data.val_path else []
    prompts = encode_records(train_records, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens,
                             processor).prompts
    val_prompts = encode_records(val_records, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens,
                                 processor).prompts
    sampler = PromptSampler(len(prompts), cfg.rollout.prompts_per_step, seed=cfg.data.seed,
                            shuffle=cfg.data.shuffle)
    if state.data_cursor:
        sampler.load_state_dict(state.data_cursor)

    memory_saver = ["--enable-memory-saver"] if cfg.rollout.release_memory_during_train else []
    if cfg.rollout.mode == "colocated":
        options = [ServerOptions(model=str(start_model), port=free_port(), tp=cfg.rollout.server_tp,
                                 return_routed_experts=cfg.train.routes_from_rollout,
                                 dtype=SERVED_DTYPES[cfg.model.params_dtype], extra_args=memory_saver + list(cfg.rollout.server_args))
                   for _ in range(cfg.rollout.num_servers)]
        # The run handles SIGTERM itself (a checkpoint first); the servers stop when it ends.
        manager = ServerManager(options, out_dir / "logs", startup_timeout_s=cfg.rollout.startup_timeout_s,
                                handle_signals=False).start()
        urls = manager.urls
    else:
        urls = [u if u.startswith("http") else f"http://{u}" for u in cfg.rollout.servers]
        manager = RemoteServers(cfg.rollout.startup_timeout_s)
    routed = None
    if cfg.train.routes_from_rollout:
        routed = RoutedExperts(policy.spec.moe_layers, policy.spec.config.moe_router_topk)
    client = RolloutClient(urls, request_timeout_s=cfg.rollout.request_timeout_s, max_retries=cfg.rollout.max_retries,
                           routed_experts=routed, on_failure=manager.ensure_alive,
                           image_token_id=layout.image_token_id if layout else None, partial=cfg.rollout.partial)
    pipeline = RolloutPipeline(client, prompts, sampler, cfg.rollout, version=version_step(state.weight_version),
                               last_step=cfg.train.steps)
    if cfg.data.reward_url:
        scorer = RemoteRewardScorer(cfg.data.reward_url, cfg.data.reward_timeout_s, workers=cfg.data.reward_workers,
                                    retries=cfg.data.reward_retries)
    else:
        scorer = RewardScorer(reward_name(cfg.data), cfg.data.reward_timeout_s, workers=cfg.data.reward_workers)
    log = RunLog(out_dir, tensorboard=cfg.logging.tensorboard, resume_step=state.step)
    run_diagnostics.drop_after(out_dir, state.step)
    eval_sets = load_sets(cfg, tokenizer, processor)
    return Rollout(client=client, pipeline=pipeline, val_prompts=val_prompts, sampler=sampler, scorer=scorer,
                   eval_sets=eval_sets, manager=manager, log=log, tokenizer=tokenizer)


def checkpoint(run: Run) -> None:
    cursor = run.rollout.sampler.state_dict() if run.rollout else {}
    state = TrainerState(step=run.step, weight_version=f"step-{run.step}", data_cursor=cursor, extra={})
    files = {}
    if run.rollout:  # the groups generated ahead of the trainer (rollout/pipeline.py)
        buffer = io.BytesIO()
        torch.save(run.rollout.pipeline.state_dict(), buffer)
        files[STATE_FILE] = buffer.getvalue()
    save_checkpoint(run.out_dir / "checkpoints", state, *run.policy.trainable,
                    run_config_text=dump_config(run.cfg), hf_config=run.policy.hf_config,
                    keep_last=run.cfg.checkpoint.keep_last, rank0_files=files)


def stop(run: Run) -> None:
    run.sync.close()
    if run.rollout:
        run.rollout.pipeline.close()
        run.rollout.scorer.close()
        for loaded in run.rollout.eval_sets:
            loaded.scorer.close()
        run.rollout.log.close()
        run.rollout.manager.stop()
