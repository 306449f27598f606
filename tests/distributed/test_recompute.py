"""Activation recompute (``parallel.recompute``) on 2 gloo ranks: the same step, less memory kept.

One ``train_minibatch`` with "selective" (core attention recomputed), "full" (uniform, one layer
per chunk: every layer recomputed) and "full" by block (the first two layers of the stage) must
give the step without recompute: loss, gradient norm, routing agreement and every updated
weight, at TP=2 (sequence parallel, T = 11 padded; 4 microbatches) and EP=2 (DP=2; 2 microbatches
per rank), plain and with R2 routing replay (routes recorded by ``compute_logprobs``, routers then moved so
that replay matters, routes replayed in the update, also by the recomputed routers).

The settings travel the user's path: ``ParallelConfig`` -> ``qwen3_moe.from_hf_config`` ->
``TransformerConfig``. Forward hooks count the calls of each layer's router and core attention
in the update, so the test fails if a mode recomputes nothing (or too much): a recomputed layer
runs its router and attention once more per microbatch; "selective" runs only attention again.

Qwen3-VL-MoE at TP=2 EP=2 on a two-image prompt: with "selective" and with "full" the gradients
of every parameter (text layers, tower, deepstack mergers) equal those without. Under "full" the
first text layers, whose outputs take the deepstack features, are recomputed in backward; the
features reach them as a layer input, so their gradient still flows back into the tower. The
tower recomputes its blocks' attention under either mode.

Tolerances (fp32): 1e-6 absolute on loss and weights, 1e-6 relative on the gradient norm and
on gradients; agreement fractions exactly (ratios of counts). Measured: 0 (the recomputed
forward repeats the same operations on the same inputs).
"""

from collections import Counter

import pytest
import torch
from test_qwen3_vl_megatron import VLLayout, reference  # noqa: F401 (fixture)
from test_routing_replay import perturb_megatron_routers, router_deltas
from test_training_update import (OPTIMIZER, TEMPERATURE, VOCAB, Layout, make_batch, with_old_logprobs,
                                  worst_over_ranks)

from megatron_sapo import models
from megatron_sapo.config import LossConfig, ParallelConfig
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.models import qwen3_moe, qwen3_vl
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.routing_replay import RoutingReplay
from megatron_sapo.training.update import train_minibatch

TOL = 1e-6
BATCHING = Batching(micro_batch_size=2)
LAYERS = range(4)  # the tiny model: MoE layers 0, 2, 3; layer 1 dense
# mode -> (ParallelConfig fields, layers whose router runs again in backward, layers whose core attention does)
MODES = {
    "none": (dict(), (), ()),
    "selective": (dict(recompute="selective"), (), LAYERS),
    "full": (dict(recompute="full"), LAYERS, LAYERS),
    "full-block-2": (dict(recompute="full", recompute_method="block", recompute_num_layers=2), (0, 1), (0, 1)),
}


class RecomputeLayout(Layout):
    """The tiny model at a layout whose recompute comes from ``ParallelConfig``, as a run's does."""

    def __init__(self, hf_dir, parallel: ParallelConfig):
        self.parallel = parallel
        self.pg = initialize_model_parallel(parallel)
        self.spec = qwen3_moe.from_hf_config(qwen3_moe.read_hf_config(hf_dir), parallel)
        self.table = qwen3_moe.weight_table(self.spec)
        self.module = qwen3_moe.build_model(self.spec, self.pg)
        load_hf_into_model(self.module, HFCheckpoint(hf_dir), self.table, self.pg)


class CallCounter:
    """Counts forward calls of each layer's router and core attention while installed."""

    def __init__(self, layers):
        self.router, self.attention = Counter(), Counter()
        self._hooks = []
        for index, layer in enumerate(layers):
            attention = layer.self_attention.core_attention
            self._hooks.append(attention.register_forward_hook(self._count(self.attention, index)))
            if hasattr(layer.mlp, "router"):
                self._hooks.append(layer.mlp.router.register_forward_hook(self._count(self.router, index)))

    @staticmethod
    def _count(counter: Counter, index: int):
        def hook(module, inputs, output):
            counter[index] += 1
        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def update_with(hf_dir, layout: dict, mode: str, replay: bool, batch, world) -> dict:
    """One update at ``layout`` under recompute ``mode``: metrics, weights, call counts."""
    run = RecomputeLayout(hf_dir, ParallelConfig(**layout, **MODES[mode][0]))
    try:
        assert run.module.config.recompute_granularity == (MODES[mode][0].get("recompute"))
        mine = batch.select(run.rows(batch))
        routing = RoutingReplay(run.module, run.pg) if replay else None
        if replay:  # R2: the old-log-prob pass records the routes the update replays
            mine.old_logprobs = compute_logprobs(run.module, mine, run.pg, batching=BATCHING,
                                                 temperature=TEMPERATURE, true_vocab_size=VOCAB, routing=routing)
            mine.routes = routing.recorded
            perturb_megatron_routers(run.module, router_deltas())
        model, optimizer, scheduler = build_optimizer(run.module, OPTIMIZER, run.pg, total_steps=1)
        calls = CallCounter(run.module.decoder.layers)
        metrics = train_minibatch(model, optimizer, scheduler, mine, LossConfig(), run.pg, batching=BATCHING,
                                  temperature=TEMPERATURE, true_vocab_size=VOCAB, routing=routing)
        calls.remove()
        return dict(metrics=metrics, weights=run.hf_weights(world), router=calls.router, attention=calls.attention)
    finally:
        destroy_model_parallel()


def assert_recomputed(result: dict, plain: dict, mode: str) -> None:
    """Each layer ran its router and attention once per microbatch, and once more where recomputed."""
    _, router_again, attention_again = MODES[mode]
    microbatches = set(plain["attention"].values())
    assert len(microbatches) == 1 and microbatches.pop() >= 2
    for counts, again, plain_counts in ((result["router"], router_again, plain["router"]),
                                        (result["attention"], attention_again, plain["attention"])):
        expected = {layer: n * (2 if layer in again else 1) for layer, n in plain_counts.items()}
        assert dict(counts) == expected, f"{mode}: calls per layer {dict(counts)}, expected {expected}"


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "r2"])
@pytest.mark.parametrize("layout", [dict(tp=2), dict(ep=2)], ids=["tp2-sp", "ep2-dp2"])
def test_recompute_gives_the_same_update(tiny_hf, world, layout, replay):
    batch = make_batch(seed=6) if replay else with_old_logprobs(tiny_hf, make_batch(seed=6), seed=7)
    results = {mode: update_with(tiny_hf, layout, mode, replay, batch, world) for mode in MODES}
    plain = results["none"]
    if replay:  # the moved routers disagree with some recorded routes: replay changes the update
        assert plain["metrics"].routing_agreement < 1
    for mode, result in results.items():
        assert_recomputed(result, plain, mode)
        metrics, expected = result["metrics"], plain["metrics"]
        assert abs(metrics.loss - expected.loss) <= TOL, f"{mode}: loss {metrics.loss} vs {expected.loss}"
        assert abs(metrics.grad_norm - expected.grad_norm) <= TOL * expected.grad_norm, mode
        assert metrics.routing_agreement == expected.routing_agreement  # recomputes are not counted again
        worst = max((result["weights"][n] - w).abs().max().item() for n, w in plain["weights"].items())
        assert worst_over_ranks(torch.tensor(worst), world) <= TOL, f"{mode}: weights differ by {worst:.2e}"


class RecomputeVLLayout(VLLayout):
    def __init__(self, tiny_vl, parallel: ParallelConfig):
        self.parallel = parallel
        self.pg = initialize_model_parallel(parallel)
        self.spec = qwen3_vl.from_hf_config(models.read_hf_config(tiny_vl), parallel)
        self.model = qwen3_vl.build_model(self.spec, self.pg)
        load_hf_into_model(self.model, HFCheckpoint(tiny_vl), models.weight_table(qwen3_vl, self.spec), self.pg)


def vl_backward(tiny_vl, inputs, weights, mode: str) -> tuple[dict, Counter, Counter]:
    """Gradients of ``sum(logits * weights)`` under recompute ``mode``, and the calls of each
    text layer's router and of each (tower, then text) block's core attention."""
    layout = RecomputeVLLayout(tiny_vl, ParallelConfig(tp=2, ep=2, **MODES[mode][0]))
    try:
        layout.model.train()
        tower = len(layout.model.vision.blocks.layers)
        counter = CallCounter(list(layout.model.vision.blocks.layers) + list(layout.model.decoder.layers))
        (layout.logits(inputs) * weights).sum().backward()
        counter.remove()
        grads = {name: p.grad.clone() for name, p in layout.model.named_parameters() if p.grad is not None}
        return grads, Counter({i - tower: n for i, n in counter.router.items()}), counter.attention
    finally:
        destroy_model_parallel()


def test_recompute_of_qwen3_vl_keeps_every_gradient(tiny_vl, reference):  # noqa: F811
    _, inputs, logits = reference
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    plain, plain_router, plain_attention = vl_backward(tiny_vl, inputs, weights, "none")
    assert any("deepstack" in name for name in plain) and any(name.startswith("vision.blocks") for name in plain)
    for mode in ("selective", "full"):
        grads, router, attention = vl_backward(tiny_vl, inputs, weights, mode)
        assert attention == {index: 2 * n for index, n in plain_attention.items()}, mode
        again = 2 if mode == "full" else 1
        assert router == {layer: again * n for layer, n in plain_router.items()}, mode
        assert sorted(grads) == sorted(plain)
        for name, expected in plain.items():
            torch.testing.assert_close(grads[name], expected, rtol=TOL, atol=TOL, msg=f"{mode}: {name}")
