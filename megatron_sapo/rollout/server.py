"""How one SGLang server is started: command line, environment, and the ``serve`` subcommand.

The same function builds the command for a colocated server started by the trainer, for the
server manager and for SLURM scripts (``megatron-sapo serve`` on dedicated rollout nodes), so
every launch agrees on the flags. Without CUDA it adds the CPU engine, the torch-native
attention backend, no CUDA graphs, a small KV cache, and the import shims of
:mod:`megatron_sapo.rollout.cpu_shims` (through ``PYTHONPATH``); with CUDA it adds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.models.qwen3_moe import moe_layer_pattern

SHIM_DIR = Path(__file__).with_name("cpu_shim")

# SGLang 0.5.23's Qwen3-VL-MoE text model hard-codes this many deepstack inputs.
SGLANG_DEEPSTACK_INPUTS = 3

# KV-cache size on CPU: SGLang sizes its pools from device memory, which means nothing on CPU.
CPU_MAX_TOTAL_TOKENS = 16384


@dataclass
class ServerOptions:
    """One SGLang server."""

    model: str
    """Hugging Face checkpoint folder (config.json, safetensors, tokenizer)."""
    port: int
    host: str = "127.0.0.1"
    tp: int = 1
    """SGLang tensor-parallel size."""
    return_routed_experts: bool = False
    """Let requests ask for the experts chosen per token (needed for R3)."""
    deterministic: bool | None = None
    """SGLang's deterministic inference (honours per-request ``sampling_seed``); None: on with
    CUDA. On CPU SGLang refuses it; the CPU shims honour the seeds instead."""
    dtype: str = "bfloat16"
    device: str | None = None
    """None: "cuda" when CUDA is present, else "cpu"."""
    extra_args: list[str] = field(default_factory=list)
    """Further SGLang arguments, passed through unchanged (they win over the defaults)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def on_cpu(self) -> bool:
        return (self.device or default_device()) == "cpu"


class UnservableModel(InputError):
    """The checkpoint uses something the pinned SGLang would serve wrongly."""


def check_servable(model_dir: str | Path) -> None:
    """Refuse checkpoints SGLang 0.5.23 would load without error but run wrongly (or crash on).

    Its Qwen3-MoE model, which Qwen3-VL-MoE's text side reuses, treats every layer as an MoE
    layer and ignores ``mlp_only_layers`` and ``decoder_sparse_step``: the dense layers' weights
    are then never loaded and those layers run on uninitialised expert weights (NaN logits in
    bf16, wrong ones in fp32). Published checkpoints have no dense layers; this catches custom
    ones. Its Qwen3-VL-MoE text model also adds exactly three deepstack inputs whatever the
    vision config says: with fewer it crashes on the first image, with more it drops the rest
    and serves wrong log-probs on image prompts (measured on a tiny model: 2e-2 off, other
    greedy tokens). Fewer than three text layers is fine: transformers drops the deepstack
    inputs past the last layer as well.
    """
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json there (expected a Hugging Face checkpoint)")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type == "qwen3_moe":
        _refuse_dense_layers(hf, f"{config_path}", "Qwen3-MoE")
    elif model_type == "qwen3_vl_moe":
        _refuse_dense_layers(hf.get("text_config") or {}, f"{config_path} text_config", "Qwen3-VL-MoE")
        deepstack = (hf.get("vision_config") or {}).get("deepstack_visual_indexes") or []
        if len(deepstack) != SGLANG_DEEPSTACK_INPUTS:
            raise UnservableModel(
                f"{config_path}: vision_config.deepstack_visual_indexes has {len(deepstack)} entries "
                f"({list(deepstack)}), but SGLang's Qwen3-VL-MoE adds exactly {SGLANG_DEEPSTACK_INPUTS} deepstack "
                "inputs to the text layers (fewer crash it, more are dropped and the outputs are wrong)")


def _refuse_dense_layers(text: dict, source: str, family: str) -> None:
    dense = [i for i, moe in enumerate(moe_layer_pattern(text)) if not moe]
    if dense:
        raise UnservableModel(
            f"{source}: layers {dense} are dense (mlp_only_layers / decoder_sparse_step), but SGLang serves "
            f"every {family} text layer as MoE and would run them with unloaded weights")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def server_command(opts: ServerOptions, python: str = sys.executable) -> list[str]:
    """The argv that starts ``opts``'s server."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(opts.model), "--host", opts.host,
           "--port", str(opts.port), "--tp-size", str(opts.tp), "--dtype", opts.dtype,
           "--device", opts.device or default_device()]
    if opts.return_routed_experts:
        cmd.append("--enable-return-routed-experts")
    if opts.deterministic if opts.deterministic is not None else not opts.on_cpu:
        cmd.append("--enable-deterministic-inference")
    if opts.on_cpu:
        defaults = {"--attention-backend": "torch_native", "--max-total-tokens": str(CPU_MAX_TOTAL_TOKENS),
                    "--mem-fraction-static": "0.05"}
        for flag, value in defaults.items():
            if flag not in opts.extra_args:
                cmd += [flag, value]
        if "--disable-cuda-graph" not in opts.extra_args:
            cmd.append("--disable-cuda-graph")
    return cmd + list(opts.extra_args)


# A trainer's launcher (torchrun) describes the trainer's own process group in these; a server
# started by a rank must not read them: under torchrun, SGLang's torch.distributed set-up would
# wait on torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE) until the start-up timeout.
LAUNCHER_VARIABLES = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT"})


def server_env(opts: ServerOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``opts``'s server: ``base`` (default: ours) without the launcher's
    rendezvous variables, plus the CPU shims.

    SGLang caches each image's vision-encoder output by the image's hash and keeps it across
    weight updates and ``/flush_cache``: after a sync, an image seen before would be served
    with the old tower's features (measured: log-probs off by 0.43 on the tiny VL model). RL
    repeats images across steps, so the cache is turned off."""
    env = {key: value for key, value in (os.environ if base is None else base).items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")}
    env["SGLANG_VLM_CACHE_SIZE_MB"] = "0"
    if opts.on_cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), env.get("PYTHONPATH")) if p)
    return env


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start an SGLang server for a Hugging Face checkpoint (CPU shims applied when CUDA is absent)",
        description="Start an SGLang rollout server. Arguments after the known ones go to SGLang unchanged, "
                    "e.g. `megatron-sapo serve --model M --port 30000 -- --max-running-requests 64`.")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 on a rollout node)")
    parser.add_argument("--tp", type=int, default=1, help="SGLang tensor-parallel size")
    parser.add_argument("--return-routed-experts", action="store_true",
                        help="allow requests to return the experts chosen per token (for R3)")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="do not enable SGLang's deterministic inference (per-request sampling seeds are "
                             "then ignored)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--print-command", action="store_true", help="print the command and exit")
    parser.add_argument("sglang_args", nargs=argparse.REMAINDER, help="extra SGLang arguments (after --)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from megatron_sapo.convert.hf_checkpoint import HFCheckpoint

    model = Path(args.model)
    HFCheckpoint(model).check()  # a corrupt file fails here, naming itself, not in the server's log
    check_servable(model)
    extra = [a for a in args.sglang_args if a != "--"]
    opts = ServerOptions(model=str(model), port=args.port, host=args.host, tp=args.tp,
                         return_routed_experts=args.return_routed_experts,
                         deterministic=False if args.no_deterministic else None, dtype=args.dtype, extra_args=extra)
    cmd = server_command(opts)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, server_env(opts))
