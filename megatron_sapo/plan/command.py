"""``megatron-sapo plan CONFIG``: the plan as text, then one JSON object as the last line; and
the check ``train`` and the SLURM launcher run before anything starts."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_sapo.config import ConfigError, RunConfig
from megatron_sapo.plan.layout import Hardware
from megatron_sapo.plan.planner import DEFAULT_GPU_MEMORY_GIB, GIB, Assumptions, Plan, plan_run

DEFAULT_GPUS_PER_NODE = 8


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="will a run config fit its GPUs, and how long will a step take (no weights needed)",
        description="Plan a run: per-GPU peak memory of training by item, the rollout servers' memory and KV "
                    "cache, and the step's work and time, from the config and the model's config.json alone. "
                    "The last line printed is one JSON object. Exit status 1 when the plan does not fit.")
    parser.add_argument("config", help="TOML run configuration")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), as for train")
    parser.add_argument("--hf-config", metavar="FILE",
                        help="the model's config.json (default: model.hf_dir/config.json, or the built-in model's)")
    parser.add_argument("--nodes", type=int, default=1, help="training nodes")
    parser.add_argument("--rollout-nodes", type=int, default=0,
                        help="nodes serving rollouts (disaggregated; default: the servers the config lists)")
    parser.add_argument("--gpus-per-node", type=int,
                        help=f"GPUs per node (default: this machine's, else {DEFAULT_GPUS_PER_NODE})")
    parser.add_argument("--gpu-memory-gib", type=float,
                        help=f"memory of one GPU in GiB (default: this machine's GPU, else {DEFAULT_GPU_MEMORY_GIB}, "
                             "an 80 GB A100/H100)")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation of training (assumption mfu)")
    parser.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                        help="override an assumption (repeatable); the report lists them all")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sapo.config_file import load_config

    cfg = load_config(args.config, list(args.set) + ["train.out_dir=."])
    hardware, notes = hardware_of(args)
    te = None  # what the config names, "auto" meaning TE: planning a GPU cluster from anywhere
    if local_gpus() is not None:  # on a GPU machine (the launcher's check): the spec this machine builds
        from megatron_sapo.models import use_transformer_engine

        te = use_transformer_engine(cfg.model.transformer_impl)
    elif cfg.model.transformer_impl == "auto":
        notes.append('model.transformer_impl = "auto": planning the TransformerEngine spec of a GPU cluster '
                     '(--set model.transformer_impl="local" plans the local one)')
    plan = plan_run(cfg, hardware, hf_config=args.hf_config, assumptions=_assumptions(args), te=te)
    for note in notes:
        print(f"note: {note}")
    print(report(plan, args.config))
    print(json.dumps(summary(plan)))
    return 0 if plan.fits else 1


def hardware_of(args: argparse.Namespace) -> tuple[Hardware, list[str]]:
    """The command line's hardware, completed from this machine's GPU or stated defaults."""
    for key in ("nodes", "gpus_per_node"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if args.rollout_nodes < 0:
        raise ConfigError(f"--rollout-nodes must be >= 0, got {args.rollout_nodes}")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}")
    local = local_gpus()
    notes = []
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = local[0] if local else DEFAULT_GPUS_PER_NODE
        if not local:
            notes.append(f"no GPU here and no --gpus-per-node: assuming {gpus} GPUs per node")
    if args.gpu_memory_gib is not None:
        memory, source = args.gpu_memory_gib, "--gpu-memory-gib"
    elif local:
        memory, source = local[1], f"this machine's {local[2]}"
    else:
        memory, source = DEFAULT_GPU_MEMORY_GIB, "default: an 80 GB A100/H100"
        notes.append(f"no GPU here and no --gpu-memory-gib: assuming {memory} GiB per GPU (an 80 GB A100/H100)")
    return Hardware(nodes=args.nodes, gpus_per_node=gpus, gpu_memory_gib=memory, rollout_nodes=args.rollout_nodes,
                    memory_source=source), notes


def local_gpus() -> tuple[int, float, str] | None:
    """This machine's GPUs: (count, GiB of the first, its name), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), props.total_memory / GIB, props.name


def _assumptions(args: argparse.Namespace) -> Assumptions:
    values: dict[str, float] = {}
    for item in args.assume:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--assume {item!r}: expected NAME=VALUE")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--assume {item!r}: {value!r} is not a number") from None
    if args.mfu is not None:
        values["mfu"] = args.mfu
    return Assumptions().replaced(values)


# ---- the check train and the launcher run ----------------------------------------------------

def check_fits(cfg: RunConfig, hardware: Hardware, *, verbose: bool = True) -> Plan:
    """The plan of ``cfg`` on ``hardware``, with the layer spec this machine builds; a
    ConfigError naming why when it does not fit, after printing the report to stderr
    (``verbose``)."""
    from megatron_sapo.models import use_transformer_engine

    plan = plan_run(cfg, hardware, te=use_transformer_engine(cfg.model.transformer_impl))
    if not plan.fits:
        if verbose:
            print(report(plan, "the run config"), file=sys.stderr)
        raise ConfigError("the plan does not fit: " + "; ".join(plan.reasons())
                          + " (the breakdown is above; --no-plan-check runs anyway)")
    return plan


# ---- report ----------------------------------------------------------------------------------

def _gib(value: float) -> str:
    """Bytes in GiB, or MiB below one GiB (the tiny models)."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.2f} MiB"


def _count(value: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def report(plan: Plan, config_name: str) -> str:
    """The plan for a reader (see the module docstring of ``memory.py`` for the moments)."""
    lay, hw, cfg_parallel = plan.layout, plan.hardware, plan.layout.parallel
    worst = plan.fullest
    text = lay.text.config
    stage = lay.stages[worst.stage]
    lines = [
        f"plan of {config_name}",
        f"model: {lay.hf_config_source}: {_count(lay.total_params)} parameters, {text.num_layers} layers, "
        f"{text.num_moe_experts or 0} experts (top-{text.moe_router_topk or 0})",
        f"training: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs of {hw.gpu_memory_gib:.1f} GiB ({hw.memory_source}); "
        f"TP{cfg_parallel.tp}{' + SP' if cfg_parallel.sequence_parallel else ''} PP{cfg_parallel.pp} "
        f"EP{cfg_parallel.ep} ETP{cfg_parallel.etp} -> DP {lay.dp}, expert DP {lay.edp}; "
        f"{'TransformerEngine' if plan.transformer_engine else 'local'} spec; recompute {cfg_parallel.recompute}",
        f"microbatch: {worst.shape.rows} row(s) x {worst.shape.seq} tokens",
        f"per GPU of pipeline stage {worst.stage} ({_count(stage.total)} parameters: {_count(stage.dense)} dense, "
        f"{_count(stage.expert)} expert), peak at the {worst.moment} moment:",
    ]
    for key, value in worst.breakdown.items():
        lines.append(f"  {key:<12}{_gib(value):>12}")
    verdict = "fits" if worst.peak <= plan.budget_bytes else "DOES NOT FIT"
    lines.append(f"  {'total':<12}{_gib(worst.peak):>12} of {_gib(plan.budget_bytes)} ({plan.budget_note}): "
                 f"{verdict}")
    lines.append("  tensors at each moment: " + ", ".join(f"{m} {_gib(v)}" for m, v in worst.moments.items()))
    if getattr(lay.spec, "vision", None) is not None:
        lines.append("  (the vision tower's weights are counted; its activations, small beside the text's, are not)")
    if worst.activation_items:
        lines.append("  activations kept per microbatch in flight: "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in worst.activation_items.items()))
    r = plan.rollout
    lines.append(f"rollout: {r.servers} SGLang server(s) of TP{r.server_tp}: weights {_gib(r.weight_bytes_per_gpu)} "
                 f"per GPU, KV {r.kv_bytes_per_token_per_gpu / 1024:.1f} KiB per token per GPU, "
                 f"{r.kv_tokens / 1e6:.2f} M KV tokens = {r.sequences} sequences of train.max_seq_len per server "
                 f"(mem_fraction_static {r.mem_fraction_static})")
    t = plan.timing
    lines.append(f"step: {t.tokens_per_step / 1e6:.2f} M tokens, {t.train_flops_per_step:.3g} training FLOPs -> "
                 f"train {t.train_s:.0f} s, rollout {t.rollout_s:.0f} s"
                 f"{' (generated during training: rollout.max_staleness)' if t.overlapped else ''}, "
                 f"weight sync {t.sync_s:.1f} s: about {t.step_s:.0f} s")
    lines.append("assumptions: " + ", ".join(f"{k}={'train.max_seq_len' if v is None else v}"
                                             for k, v in plan.assumptions.flat().items()))
    for reason in plan.reasons():
        lines.append(f"does not fit: {reason}")
    return "\n".join(lines)


def summary(plan: Plan) -> dict:
    """The JSON object the command prints last."""
    worst = plan.fullest
    t = plan.timing
    r = plan.rollout
    return {
        "fits": plan.fits,
        "reasons": plan.reasons(),
        "peak_gib_per_gpu": round(worst.peak / GIB, 3),
        "tensor_peak_gib": round(worst.tensor_peak / GIB, 3),
        "budget_gib": round(plan.budget_bytes / GIB, 3),
        "stage": worst.stage,
        "moment": worst.moment,
        "breakdown": {k: round(v / GIB, 3) for k, v in worst.breakdown.items()},
        "moments_gib": {k: round(v / GIB, 3) for k, v in worst.moments.items()},
        "stages_peak_gib": [round(s.peak / GIB, 3) for s in plan.stages],
        "microbatch": {"rows": worst.shape.rows, "seq": worst.shape.seq},
        "parameters": plan.layout.total_params,
        "layout": {"world": plan.layout.world, "dp": plan.layout.dp, "edp": plan.layout.edp},
        "tokens_per_step": t.tokens_per_step,
        "train_flops_per_step": t.train_flops_per_step,
        "train_s_estimate": round(t.train_s, 1),
        "rollout_s_estimate": round(t.rollout_s, 1),
        "sync_s_estimate": round(t.sync_s, 2),
        "step_s_estimate": round(t.step_s, 1),
        "rollout": {
            "servers": r.servers, "server_tp": r.server_tp,
            "weights_gib_per_gpu": round(r.weight_bytes_per_gpu / GIB, 3),
            "kv_tokens": int(r.kv_tokens), "sequences": r.sequences, "fits": r.fits},
        "hardware": {"nodes": plan.hardware.nodes, "gpus_per_node": plan.hardware.gpus_per_node,
                     "rollout_nodes": plan.hardware.rollout_nodes, "gpu_memory_gib": plan.hardware.gpu_memory_gib,
                     "gpu_memory_source": plan.hardware.memory_source},
        "assumptions": {**plan.assumptions.flat(), "device": plan.device,
                        "transformer_engine": plan.transformer_engine},
    }


__all__ = ["check_fits", "hardware_of", "local_gpus", "register", "report", "summary"]
