"""Token-budget microbatches and packing against the padded path and transformers, on 2 gloo ranks.

The batch's rows spread over 10x in length (two long rows, many short), so the three ways of
running it differ a lot in what they compute: the padded path (fixed rows per microbatch, each
padded to its own longest row), a token budget (rows grouped longest first, spread over
data-parallel ranks by length, so ranks get different numbers of rows), and packing (a
microbatch's rows in one sequence under a block-diagonal causal mask). Old log-probs, loss,
metrics, gradient norm and the weights after one optimizer step must equal the one-process
transformers reference at TP=2 (SP), PP=2, EP=2 (DP=2), TP=2+EP=2 and DP=2; routing replay must
replay the same routes whatever the layout of the microbatch, also under full recompute.

Tolerances (fp32), as in test_training_update.py: 1e-5 absolute on log-probs, loss, metrics
and weights, 1e-5 relative on the gradient norm; between Megatron runs that must agree, 1e-6.
"""

import pytest
import torch
import torch.distributed as dist
from rank_files import shared_dir
from test_routing_replay import EXPERTS, HFRouting, perturb_megatron_routers, per_row, router_deltas, spread
from test_training_update import layouts  # noqa: F401 (fixture)
from test_training_update import (OPTIMIZER, TEMPERATURE, TOL, VOCAB, assert_same_weights, assert_step_matches,
                                  make_batch, reference_step, with_old_logprobs, worst_over_ranks)

from megatron_sapo.config import LossConfig
from megatron_sapo.parallel.groups import destroy_model_parallel
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.routing_replay import RoutingReplay
from megatron_sapo.training.shard import assign_rows
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import TrainBatch

# (prompt length, sequence length) per row: 4 to 40 tokens, two long rows among short ones.
ROWS = [(3, 40), (2, 4), (4, 7), (2, 5), (5, 36), (3, 6), (2, 4), (3, 9)]
SEQ = max(length for _, length in ROWS)
BUDGET = 48  # the longest row rounded to TP 2 fits; the short rows share microbatches
METHODS = {"padded": Batching(micro_batch_size=2), "budget": Batching(max_tokens=BUDGET),
           "packed": Batching(max_tokens=BUDGET, pack=True)}
LAYOUTS = {"tp2-sp": dict(tp=2), "pp2": dict(pp=2), "ep2-dp2": dict(ep=2), "tp2-ep2": dict(tp=2, ep=2),
           "dp2": dict()}


def spread_batch(seed: int = 11) -> TrainBatch:
    return make_batch(seed, rows=ROWS, with_lengths=True)


def my_rows(run, batching: Batching) -> torch.Tensor:
    """This data-parallel rank's rows, assigned as the loop assigns them (balanced by length under
    a token budget)."""
    shares = assign_rows([length for _, length in ROWS], 1, dist.get_world_size(run.pg.dp),
                         balance=batching.max_tokens > 0)
    return torch.tensor(shares[dist.get_rank(run.pg.dp)][0])


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_budget_and_packing_equal_the_padded_path_and_transformers(layouts, tiny_hf, tmp_path_factory, world,
                                                                   layout):
    loss_cfg = LossConfig(name="sapo")
    batch = with_old_logprobs(tiny_hf, spread_batch())
    reference = reference_step(tiny_hf, batch, loss_cfg, OPTIMIZER, shared_dir(tmp_path_factory, "reference"))
    processed = {}
    for name, batching in METHODS.items():
        run = layouts(tiny_hf, **layout)
        rows = my_rows(run, batching)
        mine = batch.select(rows)
        logprobs = compute_logprobs(run.module, mine, run.pg, batching=batching, temperature=TEMPERATURE,
                                    true_vocab_size=VOCAB)
        assert worst_over_ranks((logprobs - reference["logprobs"][rows]).abs().max(), world) <= TOL, name
        model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
        metrics = train_minibatch(model, optimizer, scheduler, mine, loss_cfg, run.pg, batching=batching,
                                  temperature=TEMPERATURE, true_vocab_size=VOCAB)
        assert_step_matches(metrics, reference, rows=ROWS)
        assert_same_weights(run.hf_weights(world), reference["weights"])
        assert metrics.real_tokens == sum(length for _, length in ROWS)
        processed[name] = metrics.processed_tokens
        destroy_model_parallel()
    # The budget computes fewer padded positions than fixed pairs of rows, packing none at all
    # (but the rounding to the TP size).
    assert processed["packed"] < processed["budget"] < processed["padded"]
    assert processed["packed"] <= sum(length for _, length in ROWS) + 2 * len(ROWS)


def test_a_rank_with_fewer_microbatches_runs_empty_ones(layouts, tiny_hf, tmp_path_factory, world):
    """EP=2 (so DP=2), one row per microbatch, 2 rows on one rank and 6 on the other: the expert
    all-to-all needs equal counts, reached with empty microbatches, and the update is still the
    reference's."""
    loss_cfg = LossConfig(name="grpo")
    batch = with_old_logprobs(tiny_hf, spread_batch(seed=12))
    reference = reference_step(tiny_hf, batch, loss_cfg, OPTIMIZER, shared_dir(tmp_path_factory, "reference"))
    run = layouts(tiny_hf, ep=2)
    rows = torch.tensor([0, 4]) if dist.get_rank(run.pg.dp) == 0 else torch.tensor([1, 2, 3, 5, 6, 7])
    model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
    metrics = train_minibatch(model, optimizer, scheduler, batch.select(rows), loss_cfg, run.pg,
                              batching=Batching(micro_batch_size=1), temperature=TEMPERATURE, true_vocab_size=VOCAB)
    assert metrics.microbatches == 6  # rank 0: its 2 rows, then 4 empty microbatches
    assert_step_matches(metrics, reference, rows=ROWS)
    assert_same_weights(run.hf_weights(world), reference["weights"])


@pytest.mark.parametrize("layout", [dict(tp=2), dict(ep=2)], ids=["tp2-sp", "ep2"])
def test_routes_replay_the_same_under_packing_and_recompute(layouts, tiny_hf, world, layout):
    """R2: routes recorded by padded and by packed passes are the same rows' routes; replaying
    them after the routers moved gives the same update padded, packed, and padded with full
    recompute. R3: the rollout's routes replay to the same log-probs padded and packed."""
    batch = spread_batch(seed=13)
    deltas = router_deltas()
    results = {}
    for name, batching, recompute in (("padded", METHODS["padded"], False), ("packed", METHODS["packed"], False),
                                      ("recompute", METHODS["padded"], True)):
        run = layouts(tiny_hf, recompute=recompute, **layout)
        routing = RoutingReplay(run.module, run.pg)
        rows = my_rows(run, batching)
        mine = batch.select(rows)
        old = compute_logprobs(run.module, mine, run.pg, batching=batching, temperature=TEMPERATURE,
                               true_vocab_size=VOCAB, routing=routing)
        recorded = dict(zip(rows.tolist(), routing.recorded))
        perturb_megatron_routers(run.module, deltas)
        mine.old_logprobs, mine.routes = old, routing.recorded
        model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
        metrics = train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, batching=batching,
                                  temperature=TEMPERATURE, true_vocab_size=VOCAB, routing=routing)
        results[name] = recorded, metrics, run.hf_weights(world)
        destroy_model_parallel()
    plain_routes, plain, plain_weights = results["padded"]
    for name in ("packed", "recompute"):
        routes, metrics, weights = results[name]
        assert all(torch.equal(routes[row], plain_routes[row]) for row in routes if row in plain_routes), name
        assert metrics.routing_agreement == plain.routing_agreement < 1, name
        assert abs(metrics.grad_norm - plain.grad_norm) <= 1e-6 * plain.grad_norm, name
        assert max((weights[n] - plain_weights[n]).abs().max().item() for n in plain_weights) <= 1e-6, name

    hf = HFRouting(tiny_hf)
    given = hf.own_routes(batch.tokens)
    given[:, ::3] = (given[:, ::3] + 1) % EXPERTS
    logprobs = {}
    for name in ("padded", "packed"):
        run = layouts(tiny_hf, **layout)
        routing = RoutingReplay(run.module, run.pg)
        mine = batch.select(slice(None))
        mine.routes = per_row(given, mine)
        logprobs[name] = compute_logprobs(run.module, mine, run.pg, batching=METHODS[name], temperature=TEMPERATURE,
                                          true_vocab_size=VOCAB, routing=routing)
        destroy_model_parallel()
    assert spread(logprobs["packed"], logprobs["padded"], world) <= 1e-6
