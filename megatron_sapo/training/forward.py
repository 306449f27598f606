"""Forward-only passes through a (possibly pipelined) Megatron model.

Runs Megatron-Core's pipeline schedule so the same call works for PP=1 and PP>1; the last
stage returns the logits (this rank's vocabulary shard), other stages return None.
"""

from __future__ import annotations

import torch


def forward_logits(model, tokens: torch.Tensor, pg_collection) -> torch.Tensor | None:
    """Logits ``[B, S, V_local]`` of ``tokens`` ``[B, S]`` on the last pipeline stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)

    def forward_step(data_iterator, step_model):
        output = step_model(tokens, positions, None)

        def keep(output_tensor, non_loss_data=False):
            return output_tensor.detach()

        return output, keep

    schedule = get_forward_backward_func(pp_size=model.config.pipeline_model_parallel_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        collected = schedule(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
            collect_non_loss_data=True,
            pg_collection=pg_collection,
            p2p_communicator=P2PCommunicator(pp_group=pg_collection.pp, config=model.config),
        )
    model.train(was_training)
    return collected[0] if collected else None
