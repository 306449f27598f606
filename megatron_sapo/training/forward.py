"""Forward passes through a (possibly pipelined) Megatron model, one microbatch at a time.

Everything runs through Megatron-Core's pipeline schedule (``get_forward_backward_func``), so
the same code serves PP=1 and PP>1, forward-only and forward+backward. The schedule calls a
*forward step* once per microbatch on every pipeline stage; ``token_forward_step`` builds the
one forward step used by every pass of the trainer (old log-probs, policy updates, supervised
updates): it feeds the microbatch (``training/microbatch.py``: padded to its own longest row,
or packed) to the model, lets routing replay record or replay its routes, and on the last stage
hands the logits to a *head*, the pass-specific part (return log-probs, or compute a loss).
Heads read per-token results in row form through :func:`row_logprobs`, whatever the layout.

Microbatches are built one at a time as the schedule asks for them, so only the microbatch
being run has its inputs (and its replayed routes) laid out on the device. Their shapes differ,
which pipeline parallelism allows with Megatron's ``variable_seq_lengths`` (set by the model
specs when PP > 1). Under sequence parallelism Megatron splits the sequence evenly over
tensor-parallel ranks, so every microbatch's length is a multiple of the TP size.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch

from megatron_sapo.parallel import vocab_parallel_logprobs
from megatron_sapo.training.microbatch import Microbatch, build_microbatch
from megatron_sapo.types import TrainBatch, VisionInputs

# The head maps the last stage's logits [b|1, S, V_local] of one microbatch to what the pass
# needs (a loss tuple for training, log-probs for forward-only passes).
Head = Callable[[torch.Tensor, Microbatch], Any]


def sequence_multiple(model) -> int:
    """Every microbatch's length is a multiple of this: the TP size under sequence parallelism."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def takes_thd(model) -> bool:
    """Whether the model's attention takes packed rows as THD (TransformerEngine) rather than
    through a mask (the local spec's ``DotProductAttention``)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for module in model.modules():
        if hasattr(module, "core_attention"):
            return not isinstance(module.core_attention, DotProductAttention)
    return False


def microbatches(model, batch: TrainBatch, plan: list[list[int]], *, pack: bool,
                 with_routes: bool = False) -> Iterator[Microbatch]:
    """The microbatches of ``plan`` (row indices of ``batch``), each laid out when asked for."""
    multiple, thd = sequence_multiple(model), pack and takes_thd(model)
    for rows in plan:
        yield build_microbatch(batch, rows, pack=pack, multiple=multiple, thd=thd, with_routes=with_routes)


def row_logprobs(logits: torch.Tensor, micro: Microbatch, group, *, temperature: float, vocab_size: int,
                 entropy: bool = False):
    """``[b, T]`` log-probs of the microbatch's targets (and entropies) in row form, from this
    rank's vocabulary shard of the logits; the vocabulary is never gathered."""
    result = vocab_parallel_logprobs(logits, micro.targets, group=group, temperature=temperature, entropy=entropy,
                                     vocab_size=vocab_size)
    if entropy:
        return micro.unpack(result[0]), micro.unpack(result[1])
    return micro.unpack(result)


def token_forward_step(head: Head, *, routing=None, eager: bool = False):
    """The schedule's forward step: run one :class:`Microbatch` and attach ``head``.

    ``routing`` (a ``RoutingReplay`` inside its ``recording()`` or ``replaying()`` context, or
    None) sees every microbatch's forward, in schedule order.

    ``eager`` (forward-only passes, the last pipeline stage): run the head as soon as the logits
    exist and hand the schedule an empty tensor in their place. Megatron's forward-only loop
    keeps each microbatch's output until the next microbatch's forward returns, which would
    hold two microbatches' logits at once (2.8 GB per GPU at the 30B-A3B job's 36,864-token
    microbatches).
    """

    def forward_step(data_iterator, model):
        micro: Microbatch = next(data_iterator)
        with routing.microbatch(micro) if routing is not None else nullcontext():
            output = model(micro.tokens, micro.position_ids, micro.attention_mask, **micro.model_kwargs())
        if eager:
            data = head(output, micro)
            return output.new_empty(0), lambda _placeholder, non_loss_data=False: data

        def loss_func(logits, non_loss_data=False):  # the schedule names the flag; the head knows its pass
            return head(logits, micro)

        return output, loss_func

    return forward_step


def run_schedule(model, microbatches: Iterable[Microbatch], count: int, forward_step, pg_collection, *,
                 forward_only: bool, collect_non_loss_data: bool = False) -> list:
    """Run Megatron's schedule over ``count`` microbatches; returns what the last stage's heads
    returned (the metrics of a loss head, or the data of a non-loss head), an empty list on
    other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    if config.pipeline_model_parallel_size > 1 and not config.variable_seq_lengths:
        raise ValueError("pipeline parallelism with microbatches of their own lengths needs the model's "
                         "TransformerConfig.variable_seq_lengths = True (set by the model specs)")
    schedule = get_forward_backward_func(pp_size=config.pipeline_model_parallel_size, vp_size=None)
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=count,
        seq_length=0,  # shapes travel with each microbatch (variable_seq_lengths)
        micro_batch_size=0,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        pg_collection=pg_collection,
        p2p_communicator=P2PCommunicator(pp_group=pg_collection.pp, config=config),
    )


def forward_logits(model, tokens: torch.Tensor, pg_collection, *, position_ids: torch.Tensor | None = None,
                   vision: list[VisionInputs | None] | None = None) -> torch.Tensor | None:
    """Logits ``[B, S, V_local]`` of ``tokens`` ``[B, S]`` on the last pipeline stage, else None.

    Vision-language models: ``position_ids`` ``[3, B, S]`` (``mrope_position_ids``) and, per
    row, the images of that row (``vision[i]``, None for a row without)."""
    if vision is not None and position_ids is None:
        raise ValueError("forward_logits: images need their multimodal position_ids [3, B, S]")
    zeros = torch.zeros(tokens.shape, device=tokens.device)
    batch = TrainBatch(tokens=tokens, targets=tokens, loss_mask=zeros, advantages=zeros[:, 0],
                       rollout_logprobs=zeros, position_ids=position_ids, vision=vision)
    step = token_forward_step(lambda logits, micro: logits[:, :tokens.shape[1]].detach())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        collected = run_schedule(model, microbatches(model, batch, [list(range(batch.batch_size))], pack=False), 1,
                                 step, pg_collection, forward_only=True, collect_non_loss_data=True)
    model.train(was_training)
    return collected[0] if collected else None
