"""``megatron-sapo eval CONFIG --checkpoint DIR``: the config's evaluation sets on a model,
without training.

``DIR`` is a Hugging Face folder (``config.json`` and safetensors), a training checkpoint
(``OUTPUT/checkpoints/step_N``, or ``OUTPUT/checkpoints`` for its latest) or a
``convert hf-to-mcore`` output. Megatron checkpoints are first written as an HF folder under
``--output`` (``convert mcore-to-hf``), with the tokenizer of the run's start model
(``OUTPUT/start_model``) or of ``model.hf_dir``. One SGLang server serves the model; each set of
``[[eval.sets]]`` (``--only`` picks some) is sampled, scored by its reward and summarised as
avg@k and pass@k (``eval_sets.py``). The summary goes to ``--output``/eval.md and eval.json
and to the console; its last line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from megatron_sapo.config_file import load_config
from megatron_sapo.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model on the config's eval sets (avg@k, pass@k) without training",
        description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("config", help="TOML run configuration with [[eval.sets]]")
    parser.add_argument("--checkpoint", required=True,
                        help="HF folder, training checkpoint (checkpoints/step_N or checkpoints/) or mcore folder")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="evaluate only this set (repeatable)")
    parser.add_argument("--output", help="where eval.md, eval.json (and a converted model) go (default: "
                                         "CHECKPOINT-eval beside the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set rollout.sampling_seed=7")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.set, "train.out_dir=unused"])
    names = [s.name for s in cfg.eval.sets]
    if not names:
        raise InputError(f"{args.config}: no [[eval.sets]] to evaluate")
    unknown = [name for name in args.only if name not in names]
    if unknown:
        raise InputError(f"--only {unknown[0]}: no such eval set in {args.config} (sets: {', '.join(names)})")
    if args.only:
        cfg.eval.sets = [s for s in cfg.eval.sets if s.name in args.only]
    checkpoint = Path(args.checkpoint)
    out = Path(args.output) if args.output else checkpoint.with_name(checkpoint.name + "-eval")
    out.mkdir(parents=True, exist_ok=True)
    model = served_model(checkpoint, out, cfg)
    metrics = evaluate(cfg, model, out)
    table = summary_table(cfg, metrics)
    (out / "eval.md").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps({"checkpoint": str(checkpoint), **metrics}, indent=2) + "\n")
    print(table)
    print(json.dumps({"checkpoint": str(checkpoint), "output": str(out), **metrics}))
    return 0


def served_model(checkpoint: Path, out: Path, cfg) -> Path:
    """An HF folder of ``checkpoint`` with a tokenizer (converting a Megatron checkpoint)."""
    if (checkpoint / "config.json").is_file():
        from megatron_sapo.convert.hf_checkpoint import HFCheckpoint

        HFCheckpoint(checkpoint).check()  # a corrupt file fails here, naming itself
        return checkpoint
    from megatron_sapo.convert import mcore_checkpoint, streaming
    from megatron_sapo.convert.commands import hf_dtype
    from megatron_sapo.models import use_transformer_engine
    from megatron_sapo.training.checkpoint import find_latest

    step = find_latest(checkpoint) if (checkpoint / "latest").is_file() else checkpoint
    if step is None:
        raise FileNotFoundError(f"{checkpoint}/latest names no complete checkpoint")
    mcore = step / "model" if (step / "model" / mcore_checkpoint.HF_CONFIG_FILE).is_file() else step
    if not (mcore / mcore_checkpoint.HF_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint}: neither an HF folder (config.json) nor a megatron-sapo checkpoint "
                                f"({mcore_checkpoint.HF_CONFIG_FILE})")
    tokenizer_dirs = [step.parent.parent / "start_model"] + ([Path(cfg.model.hf_dir)] if cfg.model.hf_dir else [])
    tokenizer_dir = next((d for d in tokenizer_dirs if (d / "tokenizer_config.json").is_file()), None)
    if tokenizer_dir is None:
        raise InputError(f"{checkpoint}: no tokenizer found in {' or '.join(map(str, tokenizer_dirs))} (set "
                         "model.hf_dir to the model folder the run started from)")
    target = out / "hf"
    hf_config = mcore_checkpoint.read_hf_config(mcore)
    print(f"converting {mcore} to {target} ...", file=sys.stderr, flush=True)
    streaming.mcore_to_hf(mcore, target, hf_config, hf_dtype(hf_config), max_shard_bytes=5 * 2**30, force=True,
                          use_te=use_transformer_engine(cfg.model.transformer_impl))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, target / name)
    return target


def evaluate(cfg, model: Path, out: Path) -> dict[str, float]:
    from megatron_sapo import torchvision_compat
    from megatron_sapo.eval_sets import evaluate_set, load_sets
    from megatron_sapo.parallel.ports import free_port
    from megatron_sapo.rollout.client import RolloutClient
    from megatron_sapo.rollout.manager import ServerManager
    from megatron_sapo.rollout.server import ServerOptions
    from megatron_sapo.config import SERVED_DTYPES

    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(model) if "vision_config" in config else None
    sets = load_sets(cfg, tokenizer, processor)
    options = ServerOptions(model=str(model), port=free_port(), tp=cfg.rollout.server_tp,
                            dtype=SERVED_DTYPES[cfg.model.params_dtype], extra_args=list(cfg.rollout.server_args))
    metrics: dict[str, float] = {}
    print(f"starting an SGLang server for {model} ...", file=sys.stderr, flush=True)
    with ServerManager([options], out / "logs", startup_timeout_s=cfg.rollout.startup_timeout_s) as manager:
        client = RolloutClient(manager.urls, request_timeout_s=cfg.rollout.request_timeout_s,
                               max_retries=cfg.rollout.max_retries, on_failure=manager.ensure_alive,
                               image_token_id=config.get("image_token_id"))
        for i, loaded in enumerate(sets, start=1):
            start = time.perf_counter()
            print(f"[{i}/{len(sets)}] {loaded.spec.name}: {len(loaded.prompts)} problems x {loaded.spec.samples} "
                  "samples ...", file=sys.stderr, flush=True)
            try:
                metrics.update(evaluate_set(loaded, client.generate_groups, tokenizer, cfg, step=0))
            finally:
                loaded.scorer.close()
            print(f"[{i}/{len(sets)}] {loaded.spec.name}: done in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    return metrics


def summary_table(cfg, metrics: dict[str, float]) -> str:
    lines = ["| set | problems | k | avg@k | pass@k (k = 1, 2, 4, ...) | reward errors |", "|---|---|---|---|---|---|"]
    for spec in cfg.eval.sets:
        prefix, k = f"eval_{spec.name}_", spec.samples
        passes = ", ".join(f"{metrics[key]:.3f}" for key in sorted(
            (key for key in metrics if key.startswith(prefix + "pass_at_")), key=lambda key: int(key.rsplit("_", 1)[1])))
        lines.append(f"| {spec.name} | {metrics[prefix + 'problems']:.0f} | {k} | {metrics[f'{prefix}avg_at_{k}']:.3f} | "
                     f"{passes} | {metrics[prefix + 'reward_errors']:.0f} |")
    return "\n".join(lines)
