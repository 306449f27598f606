"""Qwen3-VL-MoE: token-budget microbatches and packing against the padded path, on 2 gloo ranks.

Rows with images of different sizes (one, two, none) and lengths spread over several times run
padded (fixed rows, each microbatch padded to its own longest row), under a token budget, and
packed (rows in one sequence, multimodal positions restarting at each row, images in row
order, a block-diagonal causal mask). Old log-probs, loss, gradient norm and every parameter
after one optimizer step must agree at TP=2 (SP), EP=2 (DP=2), TP=2+EP=2 and DP=2, fp32: 1e-5
absolute on log-probs, loss and parameters, 1e-5 relative on the gradient norm. (The tiny model's
3 deepstack layers must sit on the first pipeline stage, so it has no PP=2 layout.)
"""

import pytest
import torch
import torch.distributed as dist
from test_training_update import OPTIMIZER, worst_over_ranks

from megatron_sapo import models, torchvision_compat
from megatron_sapo.config import LossConfig, ParallelConfig
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.data.chat import encode_records
from megatron_sapo.data.records import PromptRecord
from megatron_sapo.models import qwen3_vl
from megatron_sapo.models.tiny_vl import png_bytes, synthetic_image
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training.batch import build_train_batch, image_layout
from megatron_sapo.training.logprobs import compute_logprobs
from megatron_sapo.training.microbatch import Batching
from megatron_sapo.training.optimizer import build_optimizer
from megatron_sapo.training.shard import assign_rows
from megatron_sapo.training.update import train_minibatch
from megatron_sapo.types import Sample

TOL = 1e-5
BUDGET = 160
METHODS = {"padded": Batching(micro_batch_size=2), "budget": Batching(max_tokens=BUDGET),
           "packed": Batching(max_tokens=BUDGET, pack=True)}


def vl_samples(tiny_vl) -> tuple[list[Sample], list]:
    """Four samples: one image, none, two images, none; responses of 12 to 40 tokens."""
    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl)
    records = [PromptRecord(0, "<image>How many squares?", "3", "f:1", images=(png_bytes(synthetic_image(7)),)),
               PromptRecord(1, "rev 12=", "21", "f:2"),
               PromptRecord(2, "a <image> b <image>", "0", "f:3",
                            images=(png_bytes(synthetic_image(8, 48)), png_bytes(synthetic_image(9))))]
    prompts = encode_records(records, processor.tokenizer, None, 200, processor).prompts
    g = torch.Generator().manual_seed(5)
    samples, vision = [], []
    for prompt, response in zip((prompts[0], prompts[1], prompts[2], prompts[1]), (12, 40, 20, 30)):
        ids = torch.randint(40, 90, (response,), generator=g).tolist()
        samples.append(Sample(prompt_ids=list(prompt.prompt_ids), response_ids=ids,
                              rollout_logprobs=[-0.5] * response, finish_reason="stop"))
        vision.append(prompt.vision)
    return samples, vision


def run_method(tiny_vl, samples, vision, layout: dict, batching: Batching):
    parallel = ParallelConfig(**layout)
    pg = initialize_model_parallel(parallel)
    spec = qwen3_vl.from_hf_config(models.read_hf_config(tiny_vl), parallel)
    module = qwen3_vl.build_model(spec, pg)
    load_hf_into_model(module, HFCheckpoint(tiny_vl), models.weight_table(qwen3_vl, spec), pg)
    shares = assign_rows([len(s.tokens) for s in samples], 1, dist.get_world_size(pg.dp),
                         balance=batching.max_tokens > 0)
    rows = shares[dist.get_rank(pg.dp)][0]
    advantages = [1.0, -0.5, 0.75, -1.0]
    batch = build_train_batch([samples[i] for i in rows], [advantages[i] for i in rows], 0,
                              vision=[vision[i] for i in rows], layout=image_layout(spec))
    logprobs = compute_logprobs(module, batch, pg, batching=batching, temperature=0.7, true_vocab_size=spec.vocab_size)
    batch.old_logprobs = logprobs + 0.2 * batch.loss_mask  # ratios off 1, the same whatever the method
    model, optimizer, scheduler = build_optimizer(module, OPTIMIZER, pg, total_steps=1)
    metrics = train_minibatch(model, optimizer, scheduler, batch, LossConfig(name="sapo"), pg, batching=batching,
                              temperature=0.7, true_vocab_size=spec.vocab_size)
    params = torch.cat([p.detach().flatten() for p in module.parameters()])
    destroy_model_parallel()
    return dict(zip(rows, logprobs)), metrics, params


@pytest.mark.parametrize("layout", [dict(tp=2), dict(ep=2), dict(tp=2, ep=2), dict()],
                         ids=["tp2-sp", "ep2-dp2", "tp2-ep2", "dp2"])
def test_vl_budget_and_packing_equal_the_padded_path(tiny_vl, world, layout):
    samples, vision = vl_samples(tiny_vl)
    results = {name: run_method(tiny_vl, samples, vision, layout, batching) for name, batching in METHODS.items()}
    plain_logprobs, plain, plain_params = results["padded"]
    for name in ("budget", "packed"):
        logprobs, metrics, params = results[name]
        for row, logp in logprobs.items():
            if row in plain_logprobs:
                n = len(samples[row].tokens)
                assert worst_over_ranks((logp[:n] - plain_logprobs[row][:n]).abs().max(), world) <= TOL, name
        assert abs(metrics.loss - plain.loss) <= TOL, name
        assert abs(metrics.grad_norm - plain.grad_norm) <= TOL * plain.grad_norm, name
        assert worst_over_ranks((params - plain_params).abs().max(), world) <= TOL, name
        assert metrics.processed_tokens < plain.processed_tokens, name
    assert plain.grad_norm > 0 and plain.tokens == sum(len(s.response_ids) for s in samples)
