"""Evaluation sets (``[[eval.sets]]``): each a prompt file with its own reward and sampling,
reported as avg@k and pass@k (``algo/evaluation.py``). Training evaluates them every
``eval.every`` steps; ``megatron-sapo eval`` evaluates a model without training."""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from megatron_sapo.algo.evaluation import sample_set_metrics
from megatron_sapo.config import EvalSet, RunConfig
from megatron_sapo.errors import InputError
from megatron_sapo.rollout.client import SamplingParams
from megatron_sapo.rollout.pipeline import sample_seed
from megatron_sapo.types import Group, Prompt

if TYPE_CHECKING:  # annotations only
    from megatron_sapo.data.rewards import RewardScorer

Generate = Callable[[list[Prompt], int, SamplingParams, list[list[int | None]], str], list[Group]]
"""``(prompts, k, sampling, seeds, rid_prefix) -> groups``: ``RolloutPipeline.generate``."""


@dataclass
class LoadedSet:
    spec: EvalSet
    prompts: list[Prompt]
    scorer: RewardScorer


def load_sets(cfg: RunConfig, tokenizer, processor) -> list[LoadedSet]:
    """Read, encode and get a scorer for every set of ``cfg.eval.sets``."""
    from megatron_sapo.data.chat import encode_records
    from megatron_sapo.data.datasets import read_prompt_file
    from megatron_sapo.data.rewards import RewardScorer

    loaded = []
    for spec in cfg.eval.sets:
        records = read_prompt_file(spec.path, spec.prompt_key or cfg.data.prompt_key,
                                   spec.answer_key or cfg.data.answer_key, cfg.data.image_key)
        encoded = encode_records(records, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens, processor)
        prompts = encoded.prompts
        if not prompts:
            raise InputError(f"eval set {spec.name!r}: no problem of {spec.path} fits data.max_prompt_tokens = "
                             f"{cfg.data.max_prompt_tokens}")
        if encoded.too_long:
            print(f"eval set {spec.name!r}: {len(encoded.too_long)} of {len(records)} problems are longer than "
                  f"data.max_prompt_tokens and left out (the first: {encoded.too_long[0]})", file=sys.stderr,
                  flush=True)
        if spec.max_problems:
            prompts = prompts[:spec.max_problems]
        loaded.append(LoadedSet(spec=spec, prompts=prompts,
                                scorer=RewardScorer(spec.reward, cfg.data.reward_timeout_s,
                                                    workers=cfg.data.reward_workers)))
    return loaded


def evaluate_set(loaded: LoadedSet, generate: Generate, tokenizer, cfg: RunConfig, step: int) -> dict[str, float]:
    """Sample ``spec.samples`` responses per problem (seeded by the step, the set and the
    problem), score them, and report avg@k and pass@k under the set's name."""
    spec = loaded.spec
    k = spec.samples
    salt = zlib.crc32(spec.name.encode())  # different sets, different seeds
    seeds = [[sample_seed(cfg.rollout.sampling_seed, -1 - step, p.index, salt * k + j) for j in range(k)]
             for p in loaded.prompts]
    sampling = SamplingParams(temperature=spec.temperature,
                              max_new_tokens=spec.max_new_tokens or cfg.rollout.max_new_tokens)
    groups = generate(loaded.prompts, k, sampling, seeds, f"eval{step}-{spec.name}")
    responses = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for g in groups for s in g.samples]
    scores = loaded.scorer.score(responses, [g.prompt.answer for g in groups for _ in g.samples],
                                 [g.prompt.fields for g in groups for _ in g.samples])
    if scores.first_error is not None:
        print(f"eval set {spec.name}: {scores.errors} reward calls failed and {scores.timeouts} timed out, "
              f"scored 0; the first:\n{scores.first_error}", file=sys.stderr, flush=True)
    per_problem = [scores.scores[i * k:(i + 1) * k] for i in range(len(groups))]
    return {**sample_set_metrics(spec.name, per_problem), f"eval_{spec.name}_reward_errors": float(scores.errors),
            f"eval_{spec.name}_reward_timeouts": float(scores.timeouts),
            **{f"eval_{spec.name}_{key}": value for key, value in scores.extra_means().items()}}
