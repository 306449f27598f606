"""One training step on a CUDA GPU equals the same step on the CPU, padded and packed (fp32).

The step: the tiny Qwen3-MoE (``models/tiny.py``, Megatron's local layer spec) with seeded
weights; old log-probs (``compute_logprobs``, then perturbed so that the ratios spread); one
SAPO ``train_minibatch`` with its optimizer step; on a one-rank group (NCCL on the GPU, gloo on
the CPU), once with fixed padded rows and once packed under a token budget.

Each half runs in a fresh process (this file run as a script) and saves its results with
``torch.save``: the CPU half must not see CUDA (``CUDA_VISIBLE_DEVICES=""``), because
``megatron_cpu.apply()`` replaces ``torch.cuda`` functions for the whole process where CUDA is
absent, and Megatron's process groups are global state, so a clean process per half is the
simple way to have both. Megatron initialises weights differently on CPU and GPU
(``use_cpu_initialization``), so both halves overwrite every parameter, by name, from one
seeded CPU generator. Nothing here imports transformers.

Tolerances (fp32, TF32 off): log-probs 1e-4 absolute, loss 1e-4 absolute, gradient norm 1e-3
relative, every weight after the step 1e-4 absolute. Adam's first step moves a weight by
``lr * g / (|g| + eps)``, at most ``lr / eps = 10`` times a gradient difference, so fp32
reduction-order noise (about 1e-7) stays far below the weight tolerance while a wrong
gradient does not.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.config import LossConfig, OptimizerConfig, ParallelConfig
from megatron_sapo.models import qwen3_moe
from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.parallel.ports import free_port
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import TrainBatch

VOCAB = TINY_QWEN3_MOE["vocab_size"]
TEMPERATURE = 0.7
PROMPT = 4
LENGTHS = [23, 9, 31, 17, 5, 28, 12, 20]
BATCHINGS = {"padded": Batching(micro_batch_size=3), "packed": Batching(max_tokens=48, pack=True)}
OPTIMIZER = OptimizerConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0)
LOGPROB_TOL, LOSS_TOL, GRAD_NORM_RTOL, WEIGHT_TOL = 1e-4, 1e-4, 1e-3, 1e-4


# ---- one half of the comparison (run as a script in its own process) ------------------------

def make_batch() -> TrainBatch:
    """Right-padded rows of random tokens; the loss covers each row's response."""
    g = torch.Generator().manual_seed(0)
    rows, width = len(LENGTHS), max(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    steps = torch.arange(width).unsqueeze(0)
    tokens = torch.randint(1, VOCAB, (rows, width), generator=g) * (steps < lengths.unsqueeze(1))
    targets = torch.cat([tokens[:, 1:], torch.zeros(rows, 1, dtype=torch.long)], dim=1)
    loss_mask = ((steps >= PROMPT - 1) & (steps < lengths.unsqueeze(1) - 1)).float()
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, advantages=torch.randn(rows, generator=g),
                      rollout_logprobs=torch.zeros(rows, width), lengths=lengths)


def seeded_weights(model) -> None:
    """Every parameter from one seeded CPU generator, in name order: norms in [0.5, 1.5],
    matrices normal with standard deviation ``1 / sqrt(fan_in)``."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                values = torch.rand(param.shape, generator=g) + 0.5
            else:
                values = torch.randn(param.shape, generator=g) / math.sqrt(param.shape[-1])
            param.copy_(values)


def one_step(batching: Batching, device: str) -> dict:
    """Old log-probs and one update of freshly seeded weights; what the test compares, on the CPU."""
    pg = initialize_model_parallel(ParallelConfig())
    try:
        spec = qwen3_moe.from_hf_config(TINY_QWEN3_MOE, ParallelConfig())
        module = qwen3_moe.build_model(spec, pg)
        seeded_weights(module)
        model, optimizer, scheduler = build_optimizer(module, OPTIMIZER, pg, total_steps=1)
        batch = make_batch().to(device)
        settings = dict(batching=batching, temperature=TEMPERATURE, true_vocab_size=VOCAB)
        logprobs = compute_logprobs(model, batch, pg, **settings)
        noise = 0.3 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2))
        batch.old_logprobs = (logprobs + noise.to(device)) * batch.loss_mask
        metrics = train_minibatch(model, optimizer, scheduler, batch, LossConfig(), pg, **settings)
        return dict(device=str(next(module.parameters()).device), logprobs=logprobs.cpu(), loss=metrics.loss,
                    grad_norm=metrics.grad_norm, microbatches=metrics.microbatches,
                    weights={name: p.detach().cpu() for name, p in module.named_parameters()})
    finally:
        destroy_model_parallel()


def run_half(device: str, out: Path) -> None:
    """Both batchings on ``device`` in this process; results saved to ``out``."""
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif torch.cuda.is_available():
        raise RuntimeError('the CPU half must run without CUDA (CUDA_VISIBLE_DEVICES="")')
    port = free_port()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        torch.save({name: one_step(batching, device) for name, batching in BATCHINGS.items()}, out)
    finally:
        dist.destroy_process_group()


# ---- the test -----------------------------------------------------------------------------

def half_in_subprocess(device: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, __file__, device, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"the {device} half failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return torch.load(out)


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_step_cuda")
    return {device: half_in_subprocess(device, folder / f"{device}.pt") for device in ("cpu", "cuda")}


@pytest.mark.parametrize("batching", BATCHINGS)
def test_step_on_cuda_matches_cpu(halves, batching):
    cpu, gpu = halves["cpu"][batching], halves["cuda"][batching]
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda")
    assert gpu["microbatches"] == cpu["microbatches"]
    assert cpu["grad_norm"] > 0, "the reference step has no gradient, so its weights compare nothing"
    logprob_diff = (gpu["logprobs"] - cpu["logprobs"]).abs().max().item()
    assert logprob_diff <= LOGPROB_TOL, f"old log-probs differ by {logprob_diff:.2e}"
    assert abs(gpu["loss"] - cpu["loss"]) <= LOSS_TOL, f"loss {gpu['loss']} on the GPU, {cpu['loss']} on the CPU"
    assert abs(gpu["grad_norm"] - cpu["grad_norm"]) <= GRAD_NORM_RTOL * cpu["grad_norm"], (
        f"gradient norm {gpu['grad_norm']} on the GPU, {cpu['grad_norm']} on the CPU")
    assert sorted(gpu["weights"]) == sorted(cpu["weights"])
    worst = max((gpu["weights"][name] - cpu["weights"][name]).abs().max().item() for name in cpu["weights"])
    assert worst <= WEIGHT_TOL, f"weights after the step differ by up to {worst:.2e}"


if __name__ == "__main__":
    run_half(sys.argv[1], Path(sys.argv[2]))
