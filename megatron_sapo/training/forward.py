"""Forward passes through a (possibly pipelined) Megatron model, one microbatch at a time.

Everything runs through Megatron-Core's pipeline schedule (``get_forward_backward_func``), so
the same code serves PP=1 and PP>1, forward-only and forward+backward. The schedule calls a
*forward step* once per microbatch on every pipeline stage; ``token_forward_step`` builds the
one forward step used by every pass of the trainer (old log-probs, policy updates, supervised
updates): it feeds the microbatch's tokens to the model, lets routing replay record or replay
the microbatch's routes, and on the last stage hands the logits to a *head*, the pass-specific
part (return log-probs, or compute a loss).

Under sequence parallelism Megatron splits the sequence evenly over tensor-parallel ranks, so
microbatches are right-padded to a multiple of the TP size here and the padding is cut off the
logits before the head sees them; causal attention keeps the real positions unaffected.

A vision-language batch (``TrainBatch.position_ids`` set) also hands the model its multimodal
RoPE positions ``[3, b, S]`` (padding positions continue the row's last position) and the
microbatch's images: the pixel patches of its rows' images, row after row, and their grids.
Text batches call the model exactly as before.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from megatron_sapo.types import TrainBatch, VisionInputs

# The head maps the last stage's logits [b, T, V_local] of one microbatch to what the pass
# needs (a loss tuple for training, log-probs for forward-only passes).
Head = Callable[[torch.Tensor, TrainBatch], Any]


def split_microbatches(batch: TrainBatch, micro_batch_size: int) -> list[TrainBatch]:
    """Consecutive rows of ``batch`` in microbatches of ``micro_batch_size`` rows.

    The pipeline schedule sends activations of one fixed shape between stages, so every
    microbatch must have the same number of rows.
    """
    rows = batch.batch_size
    if micro_batch_size < 1 or rows % micro_batch_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must be >= 1 and divide the batch's {rows} rows "
            f"(TrainBatch.tokens has shape {tuple(batch.tokens.shape)})")
    starts = range(0, rows, micro_batch_size)
    return [batch.select(slice(start, start + micro_batch_size)) for start in starts]


def padded_length(model, seq_len: int) -> int:
    """Sequence length fed to the model: a multiple of the TP size under sequence parallelism."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return -(-seq_len // multiple) * multiple


def token_forward_step(head: Head, *, seq_len: int, routing=None):
    """The schedule's forward step: run one microbatch of ``TrainBatch`` and attach ``head``.

    ``routing`` (a ``RoutingReplay`` inside its ``recording()`` or ``replaying()`` context, or
    None) sees every microbatch's forward, in schedule order.
    """

    def forward_step(data_iterator, model):
        micro: TrainBatch = next(data_iterator)
        tokens = _right_pad(micro.tokens, seq_len)
        with routing.microbatch(micro, seq_len) if routing is not None else nullcontext():
            if micro.position_ids is None:
                positions = torch.arange(seq_len, device=tokens.device).unsqueeze(0).expand_as(tokens)
                output = model(tokens, positions, None)
            else:
                output = model(tokens, _pad_positions(micro.position_ids, seq_len), None,
                               **_vision_kwargs(micro))

        def loss_func(logits, non_loss_data=False):  # the schedule names the flag; the head knows its pass
            return head(logits[:, : micro.tokens.shape[1]], micro)

        return output, loss_func

    return forward_step


def run_schedule(model, microbatches: list[TrainBatch], forward_step, pg_collection, *, seq_len: int,
                 forward_only: bool, collect_non_loss_data: bool = False) -> list:
    """Run Megatron's schedule over ``microbatches``; returns what the last stage's heads returned
    (the metrics of a loss head, or the data of a non-loss head), an empty list on other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    schedule = get_forward_backward_func(pp_size=config.pipeline_model_parallel_size, vp_size=None)
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=microbatches[0].batch_size,
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
    zeros = torch.zeros(tokens.shape)
    batch = TrainBatch(tokens=tokens, targets=tokens, loss_mask=zeros, advantages=zeros[:, 0],
                       rollout_logprobs=zeros, position_ids=position_ids, vision=vision)
    seq_len = padded_length(model, tokens.shape[1])
    step = token_forward_step(lambda logits, micro: logits.detach(), seq_len=seq_len)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        collected = run_schedule(model, [batch], step, pg_collection, seq_len=seq_len, forward_only=True,
                                 collect_non_loss_data=True)
    model.train(was_training)
    return collected[0] if collected else None


def _vision_kwargs(micro: TrainBatch) -> dict:
    """The microbatch's images as the model's forward takes them (nothing for text-only rows)."""
    images = micro.vision_inputs
    if images is None:
        return {}
    return {"pixel_values": images.pixel_values, "image_grid_thw": images.image_grid_thw}


def _pad_positions(position_ids: torch.Tensor, length: int) -> torch.Tensor:
    """``[3, b, T]`` positions right-padded to ``length``, continuing each row's last position."""
    pad = length - position_ids.shape[2]
    if pad == 0:
        return position_ids
    steps = torch.arange(1, pad + 1, device=position_ids.device)
    return torch.cat([position_ids, position_ids[:, :, -1:] + steps], dim=2)


def _right_pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    if tokens.shape[1] == length:
        return tokens
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))
