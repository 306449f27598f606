"""Measure the peak tensor memory of a real RL training step, to hold the planner to it.

What is measured is *tensor memory*, what the planner predicts, not process RSS (which also
holds Python, the libraries, gloo's buffers and whatever malloc keeps after a free):

* on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the model;
* on CPU, torch's profiler with ``profile_memory=True``: c10's CPU allocator reports every
  allocation and free made while profiling; replaying them in time order gives the bytes
  allocated during the step and still alive, whose peak is the CPU's
  ``max_memory_allocated``. Profiling starts before the model is built, so weights, gradient
  buffers and Adam's state are in it.

The step is the trainer's own (``compute_logprobs``, then ``train_minibatch`` per minibatch) on a
model built from a ``config.json`` with Megatron's random initialisation, over rows of random
tokens; only the rows and weights are synthetic. Collective: every rank of the job calls it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_sapo.config import RunConfig
from megatron_sapo.types import TrainBatch


@dataclass(frozen=True)
class Measured:
    peak_bytes: float
    """Peak tensor memory of this rank over the step."""
    method: str
    """How it was measured (said in reports)."""


@contextmanager
def peak_tensor_memory(device: str):
    """Yields a list that holds one ``Measured`` once the block is done."""
    result: list[Measured] = []
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result.append(Measured(torch.cuda.max_memory_allocated() - start, "torch.cuda.max_memory_allocated"))
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    result.append(Measured(_profiled_peak(prof), "torch.profiler CPU allocation events, replayed"))


def _profiled_peak(prof) -> float:
    """Peak of the bytes allocated while profiling and not yet freed. Replayed from the
    allocation events rather than read from their ``total_allocated``: that running total is
    the allocator reporter's since the process started profiling for the first time, so it
    carries whatever earlier profiled blocks are still alive (and drops when they are freed)."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event)
    events.sort(key=lambda e: e.start_time_ns)
    live: dict[int, int] = {}
    total = peak = 0
    for event in events:
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = fields.alloc_size
            total += fields.alloc_size
            peak = max(peak, total)
        else:
            total -= live.pop(fields.ptr, 0)
    return float(peak)


def random_batch(lengths: list[int], vocab: int, seed: int) -> TrainBatch:
    """Rows of random tokens right-padded to the longest; every target of a row is a loss token."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    lengths_B = torch.tensor(lengths)
    inside_BT = torch.arange(width).unsqueeze(0) < lengths_B.unsqueeze(1)
    tokens = torch.randint(1, vocab, (rows, width), generator=g) * inside_BT
    targets = torch.cat([tokens[:, 1:], torch.zeros(rows, 1, dtype=torch.long)], dim=1)
    loss_mask = (torch.arange(width).unsqueeze(0) < (lengths_B - 1).unsqueeze(1)).float()
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, advantages=torch.randn(rows, generator=g),
                      rollout_logprobs=torch.zeros(rows, width), lengths=lengths_B)


def measure_step(cfg: RunConfig, hf_config: dict, lengths: list[int], pg, *, device: str, seed: int = 0) -> Measured:
    """Build ``cfg``'s model of ``hf_config`` on this rank, then run one RL step over this
    replica's ``lengths`` (old log-probs, ``train.minibatches`` updates); its peak tensor memory."""
    import torch.distributed as dist

    from megatron_sapo.models import model_family
    from megatron_sapo.training.logprobs import compute_logprobs
    from megatron_sapo.training.microbatch import Batching
    from megatron_sapo.training.optimizer import build_optimizer
    from megatron_sapo.training.setup import PARAMS_DTYPES
    from megatron_sapo.training.update import train_minibatch

    family = model_family(hf_config)
    spec = family.from_hf_config(hf_config, cfg.parallel, router=cfg.router,
                                 params_dtype=PARAMS_DTYPES[cfg.model.params_dtype])
    batching = Batching.of(cfg.train)
    settings = dict(batching=batching, temperature=1.0, true_vocab_size=spec.vocab_size)
    with peak_tensor_memory(device) as result:
        model = family.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp))
        trainable = build_optimizer(model, cfg.optimizer, pg, total_steps=cfg.train.minibatches)
        batch = random_batch(lengths, spec.vocab_size, seed).to(device)
        batch.old_logprobs = compute_logprobs(trainable.model, batch, pg, **settings)
        per_minibatch = len(lengths) // cfg.train.minibatches
        for m in range(cfg.train.minibatches):
            rows = batch.select(slice(m * per_minibatch, (m + 1) * per_minibatch))
            train_minibatch(*trainable, rows, cfg.loss, pg, **settings)
        del trainable, model, batch
    return result[0]


__all__ = ["Measured", "measure_step", "peak_tensor_memory", "random_batch"]
