"""MoE routing replay (R2, R3) on 2 gloo ranks at TP=2 with SP, EP=2 and PP=2, against transformers.

The transformers model stands in for the rollout engine: forward hooks on its MoE gates report
the experts its routers choose (the routes an engine returns for R3) or force given experts,
weighting them like Megatron's replay does (softmax of the router's logits over the chosen
experts). With forced routes it is the reference for what a replayed Megatron forward must
compute. The tiny model has MoE layers 0, 2 and 3 (layer 1 is dense), so at PP=2 the routes
of the first stage's single MoE layer and of the second stage's two must be picked out of the
whole model's route tensor; at T = 11 under TP=2 with SP the sequence is padded. R2 is checked
end to end: routes recorded in the old-log-prob pass, routers then moved, and the training step
must compute the log-probs of the recorded experts (every ratio to them is 1), also when
activations are recomputed in backward under 1F1B.

Tolerances (fp32): 1e-5 on log-probs against transformers, 1e-6 between Megatron runs that
must agree; agreement fractions are compared exactly (they are ratios of counts).
"""

import pytest
import torch
from test_training_update import layouts  # noqa: F401 (fixture)
from test_training_update import (OPTIMIZER, SEQ, TEMPERATURE, TOL, VOCAB, hf_model, make_batch,
                                  worst_over_ranks)

from megatron_sapo.config import LossConfig
from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.parallel.groups import destroy_model_parallel
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.routing_replay import RoutingReplay
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import TrainBatch

EXPERTS = TINY_QWEN3_MOE["num_experts"]
TOP_K = TINY_QWEN3_MOE["num_experts_per_tok"]
LAYOUTS = [dict(tp=2), dict(ep=2), dict(pp=2)]
LAYOUT_IDS = ["tp2-sp", "ep2", "pp2"]


class HFRouting:
    """The transformers model whose MoE gates can report or be told the experts of each token."""

    def __init__(self, hf_dir):
        self.model = hf_model(hf_dir).eval()
        self.gates = {index: layer.mlp.gate for index, layer in enumerate(self.model.model.layers)
                      if hasattr(layer.mlp, "gate")}

    @torch.no_grad()
    def own_routes(self, tokens: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, T, moe_layers, K]``: the experts each router chooses."""
        chosen = []
        hooks = [gate.register_forward_hook(lambda gate, args, out: chosen.append(out[2]))
                 for gate in self.gates.values()]
        try:
            self.model(tokens)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([c.view(*tokens.shape, TOP_K) for c in chosen], dim=2).to(torch.int32)

    @torch.no_grad()
    def forced(self, batch: TrainBatch, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each router forced to ``routes``: masked ``[B, T]`` log-probs of the targets, and the
        experts each router would have chosen itself in that forward (``[B, T, moe_layers, K]``)."""
        own = []
        hooks = [gate.register_forward_hook(self._forcing(routes[:, :, i].reshape(-1, TOP_K).long(), own))
                 for i, gate in enumerate(self.gates.values())]
        try:
            logits = self.model(batch.tokens).logits
        finally:
            for hook in hooks:
                hook.remove()
        logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        return logp * batch.loss_mask, torch.stack([o.view(*batch.tokens.shape, TOP_K) for o in own], dim=2)

    @staticmethod
    def _forcing(experts: torch.Tensor, own: list):
        def hook(gate, args, output):
            logits, _, chosen = output
            own.append(chosen)
            weights = torch.softmax(logits.float().gather(-1, experts), dim=-1).to(logits.dtype)
            return logits, weights, experts
        return hook

    @torch.no_grad()
    def perturb_routers(self, deltas: dict[int, torch.Tensor]) -> None:
        for layer, delta in deltas.items():
            self.gates[layer].weight.add_(delta)


def router_deltas(seed: int = 7) -> dict[int, torch.Tensor]:
    """A large change of every router's weights, keyed by global layer index."""
    g = torch.Generator().manual_seed(seed)
    hidden = TINY_QWEN3_MOE["hidden_size"]
    return {layer: 0.5 * torch.randn(EXPERTS, hidden, generator=g) for layer in (0, 2, 3)}


@torch.no_grad()
def perturb_megatron_routers(module, deltas: dict[int, torch.Tensor]) -> None:
    for layer in module.decoder.layers:
        if hasattr(layer.mlp, "router"):
            layer.mlp.router.weight.add_(deltas[layer.layer_number - 1])


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (token, layer): whether two route tensors choose the same set of experts."""
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


def spread(a: torch.Tensor, b: torch.Tensor, world) -> float:
    return worst_over_ranks((a - b).abs().max(), world)


def per_row(routes: torch.Tensor, batch: TrainBatch) -> list[torch.Tensor]:
    """Dense ``[B, T, L, K]`` routes as ``TrainBatch.routes``: each row's first length - 1 positions."""
    return [row[:length - 1].to(torch.uint8) for row, length in zip(routes, batch.row_lengths)]


def dense(routes: list[torch.Tensor]) -> torch.Tensor:
    """``TrainBatch.routes`` of rows of one length as ``[B, T - 1, L, K]``."""
    return torch.stack(routes).to(torch.int32)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_r3_replays_the_given_routes(layouts, tiny_hf, world, layout):
    hf = HFRouting(tiny_hf)
    batch = make_batch()
    own = hf.own_routes(batch.tokens)
    moved = own.clone()
    moved[:, ::2] = (moved[:, ::2] + 1) % EXPERTS  # another expert set at every even position
    moved[0, 3, 0] = moved[0, 3, 0, 0]  # the same expert twice: replayed as experts 0..K-1, not counted
    counted = torch.ones(own.shape[:3], dtype=torch.bool)
    counted[0, 3, 0] = False
    counted[:, -1] = False  # a row's last token has no route (nothing follows it)
    forced = moved.clone()
    forced[0, 3, 0] = torch.arange(TOP_K, dtype=torch.int32)
    forced[:, -1] = torch.arange(TOP_K, dtype=torch.int32)
    reference, own_when_forced = hf.forced(batch, forced)

    run = layouts(tiny_hf, **layout)
    routing = RoutingReplay(run.module, run.pg)
    rows = run.rows(batch)

    def logprobs(routes=None, replay=None):
        mine = batch.select(rows)
        mine.routes = None if routes is None else per_row(routes[rows], mine)
        return compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                                true_vocab_size=VOCAB, routing=replay)

    plain = logprobs()
    with_own = logprobs(own, routing)
    assert routing.agreement == 1.0
    assert spread(with_own, plain, world) <= 1e-6
    with_moved = logprobs(moved, routing)
    # Later layers see what the replayed experts of earlier layers computed, so the routers' own
    # choice in this forward is not ``own``.
    assert routing.agreement == same_sets(own_when_forced, moved)[counted].double().mean().item() < 1
    assert spread(with_moved, reference[rows], world) <= TOL
    assert spread(with_moved, plain, world) > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_r2_records_then_replays_in_training(layouts, tiny_hf, world, layout):
    hf = HFRouting(tiny_hf)
    batch = make_batch()
    own = hf.own_routes(batch.tokens)
    run = layouts(tiny_hf, **layout)
    routing = RoutingReplay(run.module, run.pg)
    rows = run.rows(batch)
    mine = batch.select(rows)

    compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                     true_vocab_size=VOCAB, routing=routing)
    assert [tuple(r.shape) for r in routing.recorded] == [(SEQ - 1, 3, TOP_K)] * mine.batch_size
    assert all(r.dtype == torch.uint8 and r.device.type == "cpu" for r in routing.recorded)
    assert worst_over_ranks((~same_sets(dense(routing.recorded), own[rows][:, :-1])).sum(), world) == 0

    deltas = router_deltas()
    hf.perturb_routers(deltas)
    perturb_megatron_routers(run.module, deltas)
    forced = own.clone()
    forced[:, -1] = torch.arange(TOP_K, dtype=torch.int32)  # no route recorded for a row's last token
    reference, own_when_forced = hf.forced(batch, forced)  # new routers' weights, recorded experts
    expected_agreement = same_sets(own_when_forced, own)[:, :-1].double().mean().item()
    mine.routes = routing.recorded

    replayed = compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                                true_vocab_size=VOCAB, routing=routing)
    assert spread(replayed, reference[rows], world) <= TOL
    assert routing.agreement == expected_agreement < 1
    unreplayed = compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                                  true_vocab_size=VOCAB)
    assert spread(unreplayed, replayed, world) > 1e-3

    # The training forward replays the recorded experts too: its log-probs equal the reference,
    # so every ratio to it is 1.
    mine.old_logprobs = reference[rows]
    model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
    metrics = train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, batching=Batching(2),
                              temperature=TEMPERATURE, true_vocab_size=VOCAB, routing=routing)
    assert metrics.routing_agreement == expected_agreement
    assert abs(metrics.ratio_min - 1) <= TOL and abs(metrics.ratio_max - 1) <= TOL


def test_routes_of_the_wrong_shape_are_refused(layouts, tiny_hf):
    run = layouts(tiny_hf)
    routing = RoutingReplay(run.module, run.pg)
    mine = make_batch().select(run.rows(make_batch()))
    mine.routes = [torch.zeros(SEQ - 1, 4, TOP_K, dtype=torch.uint8)] * mine.batch_size  # 4 layers; 3 are MoE
    shapes = r"TrainBatch.routes\[0\] has shape \(10, 4, 2\); expected \[10, 3, 2\]"
    with pytest.raises(ValueError, match=shapes):
        compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=1.0, true_vocab_size=VOCAB,
                         routing=routing)
    mine.routes = None
    compute_logprobs(run.module, mine, run.pg, batching=Batching(2), temperature=1.0, true_vocab_size=VOCAB,
                     routing=routing)  # the failed pass left the routers clean: this one records
    assert [tuple(r.shape) for r in routing.recorded] == [(SEQ - 1, 3, TOP_K)] * mine.batch_size


def test_replay_survives_activation_recompute(layouts, tiny_hf, world):
    """PP=2, 1F1B over 4 microbatches with every layer recomputed in backward: the recomputed
    routers must replay the routes of the microbatch being recomputed, not the last one set, so
    the update equals the one without recompute."""
    batch = make_batch()
    deltas = router_deltas()
    results = {}
    for recompute in (False, True):
        run = layouts(tiny_hf, pp=2, recompute=recompute)
        routing = RoutingReplay(run.module, run.pg)
        old = compute_logprobs(run.module, batch, run.pg, batching=Batching(2), temperature=TEMPERATURE,
                               true_vocab_size=VOCAB, routing=routing)
        perturb_megatron_routers(run.module, deltas)
        mine = batch.select(slice(None))
        mine.old_logprobs, mine.routes = old, routing.recorded
        model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
        metrics = train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, batching=Batching(2),
                                  temperature=TEMPERATURE, true_vocab_size=VOCAB, routing=routing)
        results[recompute] = metrics, run.hf_weights(world)
        destroy_model_parallel()
    (plain, plain_weights), (recomputed, recomputed_weights) = results[False], results[True]
    assert recomputed.routing_agreement == plain.routing_agreement  # recomputes are not counted again
    assert abs(recomputed.grad_norm - plain.grad_norm) <= 1e-6 * plain.grad_norm
    assert max((recomputed_weights[n] - plain_weights[n]).abs().max().item() for n in plain_weights) <= 1e-6
