"""MoE routing replay (R2 and R3) for one model's pipeline stage, on Megatron-Core's RouterReplay.

Routing replay makes the training forward use given experts instead of the router's own top-k:
R2 replays the routes the trainer itself chose in the old-log-prob pass, R3 the routes the
rollout engine chose while sampling. The expert *weights* still come from the current router
(a softmax over the router's logits at the replayed experts), so the router keeps a gradient.

Routes travel as ``TrainBatch.routes``: per row, ``[length - 1, moe_layers, top_k]`` over all
MoE layers of the whole model (dense layers have no entry), indexed by input position, in the
smallest integer type that holds the expert ids (``types.route_dtype``: uint8 up to 256
experts), on the CPU, for the rank's own rows only. A microbatch lays its rows' routes out on
the device as it runs (``training/microbatch.py``, padded or packed). Megatron's
``RouterReplay`` (one per MoE layer, created when ``moe_enable_routing_replay`` is on) wants,
per layer of this stage, ``[tokens, top_k]`` in the router's own token order: sequence-major
(``s * b + i``), and under sequence parallelism only this tensor-parallel rank's slice of the
sequence. This module converts between the two. Recording keeps each microbatch's routes on
the device in the small type until the pass ends, then gathers the sequence slices, picks each
row's real tokens and moves them to the CPU, one microbatch at a time.

Choices:

* Each router's ``RouterReplay`` instance is driven directly rather than through its global
  class-level registry, which holds the routers of every model built in the process.
* Replay uses ``REPLAY_FORWARD`` inside the forward step and ``REPLAY_BACKWARD`` outside it,
  so activation recompute during backward pops the same microbatch's routes (Megatron keeps
  them in a first-in first-out list; every schedule runs backward passes in forward order).
  Recomputing only some microbatches would break that order, so it is refused.
* A token whose replayed ids are not ``top_k`` distinct valid experts (padding, positions the
  rollout engine returned nothing for) gets experts ``0..top_k-1``: duplicate ids would break
  the all-to-all split sizes. Such tokens are left out of the agreement metric.
* Agreement, the fraction of (token, layer) routes where the router's own top-k set equals the
  replayed set, is counted while replaying by a forward hook that re-runs the router's gating
  (one small matmul) through Megatron's own top-k function; it shows how far the trainer's
  own routing has drifted from the replayed one (for R3: trainer against rollout engine).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_sapo.config import ConfigError
from megatron_sapo.parallel.collectives import all_gather_cat, comm_device
from megatron_sapo.training.microbatch import Microbatch
from megatron_sapo.types import TrainBatch, route_dtype


class RoutingReplay:
    """Records or replays the routes of the MoE layers on this rank's pipeline stage."""

    def __init__(self, model, pg_collection):
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.utils import get_attr_wrapped_model, get_model_config

        config = get_model_config(model)
        pattern = moe_layer_pattern(config)
        if not any(pattern):
            raise ConfigError("routing replay needs MoE layers; the model has none")
        if config.moe_router_fusion:
            raise ConfigError("routing replay is bypassed by the fused router: set moe_router_fusion=False")
        moe_index = {layer: sum(pattern[:layer]) for layer, is_moe in enumerate(pattern) if is_moe}
        self.num_moe_layers = sum(pattern)
        self.top_k = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self._config = config
        self._pg = pg_collection
        self._routers = []
        self._layers = []  # global MoE-layer index of each router on this stage
        for layer in get_attr_wrapped_model(model, "decoder").layers:
            if not isinstance(layer.mlp, MoELayer):
                continue
            if layer.mlp.router.router_replay is None:
                raise ConfigError("routing replay needs moe_enable_routing_replay=True "
                                  "(router.routing_replay in the config)")
            self._routers.append(layer.mlp.router)
            self._layers.append(moe_index[layer.layer_number - 1])
        self.route_dtype = route_dtype(self.num_experts)
        self._mode: str | None = None
        self._hooks = []  # agreement counters on the routers, while replaying
        self._recorded: list[tuple[Microbatch, torch.Tensor]] = []
        self._valid: list[torch.Tensor] = []
        # [agreeing, counted] (token, layer) routes of the current replay pass, on the device
        # the collectives use.
        self._agreement_counts = torch.zeros(2, dtype=torch.float64, device=comm_device(pg_collection.dp_cp))
        self.recorded: list[torch.Tensor] | None = None
        """After ``recording()``: the routes of the pass as ``TrainBatch.routes`` (per row
        ``[length - 1, moe_layers, top_k]``, CPU), on every rank of the replica."""
        self.agreement: float | None = None
        """After ``replaying()``: fraction of valid (token, layer) routes of the pass on which the
        router's own choice equals the replayed one, over all ranks; None if nothing was replayed."""

    # -- passes ------------------------------------------------------------------------------

    @contextmanager
    def recording(self, batch: TrainBatch) -> Iterator["RoutingReplay"]:
        """A pass over ``batch`` that records each microbatch's routes; on exit ``recorded``
        holds them (collective)."""
        self._begin("record")
        try:
            yield self
            self.recorded = self._assemble_recorded(batch)
        finally:
            self._end()

    @contextmanager
    def replaying(self, batch: TrainBatch) -> Iterator["RoutingReplay"]:
        """A pass that replays ``batch.routes`` microbatch by microbatch; on exit ``agreement`` is
        set (collective). The routes are checked here, before any rank enters the schedule."""
        self._check_routes(batch)
        self._begin("replay")
        try:
            yield self
            self.agreement = self._global_agreement()
        finally:
            self._end()

    @contextmanager
    def microbatch(self, micro: Microbatch) -> Iterator[None]:
        """Wraps the forward of one microbatch; called in schedule order."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self._mode is None:
            raise RuntimeError("RoutingReplay.microbatch outside recording() or replaying()")
        if self._mode == "replay":
            self._set_targets(micro)
            self._set_action(RouterReplayAction.REPLAY_FORWARD)
        else:
            self._set_action(RouterReplayAction.RECORD)
        yield
        if self._mode == "replay":
            # Until the next forward step, router calls are backward recomputes of earlier microbatches.
            self._set_action(RouterReplayAction.REPLAY_BACKWARD)
        elif micro.row_index:  # an empty microbatch has no rows to record for
            self._recorded.append((micro, self._collect_recorded(micro)))

    # -- replay ------------------------------------------------------------------------------

    def _check_routes(self, batch: TrainBatch) -> None:
        if batch.routes is None:
            raise ValueError("routing replay needs TrainBatch.routes (R3: from the rollout; R2: recorded)")
        if len(batch.routes) != batch.batch_size:
            raise ValueError(f"TrainBatch.routes holds {len(batch.routes)} rows for a batch of {batch.batch_size}")
        for row, (routes, length) in enumerate(zip(batch.routes, batch.row_lengths)):
            expected = (length - 1, self.num_moe_layers, self.top_k)
            if tuple(routes.shape) != expected:
                raise ValueError(f"TrainBatch.routes[{row}] has shape {tuple(routes.shape)}; expected "
                                 f"{list(expected)} [row length - 1, MoE layers of the whole model, top_k]")

    def _set_targets(self, micro: Microbatch) -> None:
        if micro.routes is None:  # an empty microbatch: nothing to replay, nothing counted
            shape = (*micro.tokens.shape, self.num_moe_layers, self.top_k)
            routes = torch.full(shape, -1, dtype=torch.long, device=micro.tokens.device)
        else:
            routes = micro.routes
        routes, valid = distinct_routes(routes, self.num_experts)
        self._valid = []
        for router, layer in zip(self._routers, self._layers):
            # [B, S, K] -> [S, B, K]: the router reads tokens sequence-major.
            local = self._sequence_slice(routes[:, :, layer].transpose(0, 1))
            router.router_replay.set_target_indices(local.reshape(-1, self.top_k).contiguous())
            self._valid.append(self._sequence_slice(valid[:, :, layer].transpose(0, 1)).reshape(-1))

    def _count_agreement(self, position: int, router, args, output) -> None:
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if router.router_replay.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
            return  # a backward recompute: its tokens were counted in the forward
        cfg = router.config
        with torch.no_grad():
            logits = router.gating(args[0]).view(-1, cfg.num_moe_experts)
            _, own = topk_routing_with_score_function(
                logits, router.topk, use_pre_softmax=cfg.moe_router_pre_softmax,
                num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
                scaling_factor=cfg.moe_router_topk_scaling_factor, score_function=router.score_function,
                expert_bias=router.expert_bias)
            same = (own == output[1]).all(dim=-1)
            valid = self._valid[position]
            counts = torch.stack([(same & valid).sum(), valid.sum()])
            self._agreement_counts += counts.to(self._agreement_counts)

    def _global_agreement(self) -> float | None:
        counts = self._agreement_counts.clone()
        for group in (self._pg.mp, self._pg.dp_cp):  # tensor x pipeline ranks, then data-parallel replicas
            dist.all_reduce(counts, group=group)
        return None if counts[1] == 0 else float(counts[0] / counts[1])

    # -- record ------------------------------------------------------------------------------

    def _collect_recorded(self, micro: Microbatch) -> torch.Tensor:
        """This microbatch's routes on this rank, in the small route type:
        ``[S_local, b, MoE layers of this stage, K]``."""
        b, seq_len = micro.tokens.shape
        shape = (seq_len // self._sequence_parallel_size(), b, self.top_k)
        layers = [router.router_replay.get_recorded_indices() for router in self._routers]
        if any(indices is None for indices in layers):
            raise RuntimeError("a router recorded no routes; is router fusion on?")
        if not layers:  # a pipeline stage of dense layers only
            return torch.zeros(shape[0], shape[1], 0, shape[2], dtype=self.route_dtype, device=micro.tokens.device)
        return torch.stack([indices.view(shape) for indices in layers], dim=2).to(self.route_dtype)

    def _assemble_recorded(self, batch: TrainBatch) -> list[torch.Tensor]:
        """The recorded routes as ``TrainBatch.routes`` for ``batch``, on every rank of the
        replica (collective over the tensor- and pipeline-parallel groups)."""
        rows: list[torch.Tensor | None] = [None] * batch.batch_size
        device = comm_device(self._pg.pp)
        for micro, local in self._recorded:  # local: [S_local, b, L_local, K]
            if self._sequence_parallel_size() > 1:
                local = all_gather_cat(local.to(comm_device(self._pg.tp)), self._pg.tp, dim=0)
            per_row = micro.unpack(local.transpose(0, 1))  # [b, T, L_local, K]
            full = per_row.new_zeros(*per_row.shape[:2], self.num_moe_layers, self.top_k)
            full[:, :, self._layers] = per_row
            if dist.get_world_size(self._pg.pp) > 1:  # each MoE layer lives on exactly one stage
                full = full.to(device)
                dist.all_reduce(full, group=self._pg.pp)
            for row, index, length in zip(full, micro.row_index, micro.rows.row_lengths):
                rows[index] = row[:length - 1].cpu()
        if any(row is None for row in rows):
            raise RuntimeError("routing replay recorded no routes for some rows of the batch")
        return rows

    # -- shared ------------------------------------------------------------------------------

    def _sequence_parallel_size(self) -> int:
        return dist.get_world_size(self._pg.tp) if self._config.sequence_parallel else 1

    def _sequence_slice(self, tensor_S: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's share of the sequence (the first dimension) under SP."""
        parts = self._sequence_parallel_size()
        if parts == 1:
            return tensor_S
        return tensor_S.chunk(parts, dim=0)[dist.get_rank(self._pg.tp)]

    def _set_action(self, action) -> None:
        for router in self._routers:
            router.router_replay.set_router_replay_action(action)

    def _begin(self, mode: str) -> None:
        if self._mode is not None:
            raise RuntimeError(f"RoutingReplay is already {self._mode}ing")
        if mode == "replay" and self._config.num_microbatches_with_partial_activation_checkpoints is not None:
            raise ConfigError("routing replay cannot follow partial activation recompute "
                              "(num_microbatches_with_partial_activation_checkpoints)")
        self._mode = mode
        self._recorded, self._valid = [], []
        self._agreement_counts.zero_()
        if mode == "record":
            self.recorded = None
        else:
            self.agreement = None
            self._hooks = [router.register_forward_hook(partial(self._count_agreement, position))
                           for position, router in enumerate(self._routers)]

    def _end(self) -> None:
        for router in self._routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._recorded, self._valid = [], [], []
        self._mode = None


def moe_layer_pattern(config) -> tuple[bool, ...]:
    """Per layer of the whole model, whether it is an MoE layer (Megatron's ``moe_layer_freq``)."""
    if not config.num_moe_experts:
        return (False,) * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return tuple(layer % freq == 0 for layer in range(config.num_layers))
    return tuple(bool(flag) for flag in freq)


def distinct_routes(routes: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(routes, valid)``: tokens whose ids are not distinct experts in ``[0, num_experts)`` get
    ids ``0..K-1`` and ``valid`` False (``routes [..., K]``, ``valid [...]``)."""
    in_range = ((routes >= 0) & (routes < num_experts)).all(dim=-1)
    ordered = routes.sort(dim=-1).values
    distinct = (ordered[..., 1:] != ordered[..., :-1]).all(dim=-1)
    valid = in_range & distinct
    fallback = torch.arange(routes.shape[-1], device=routes.device).expand_as(routes)
    return torch.where(valid.unsqueeze(-1), routes, fallback), valid
