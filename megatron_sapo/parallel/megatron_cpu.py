"""Megatron-Core 0.16 on a CPU-only torch build with gloo.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths:
RNG state tracking, streams and events, ``device="cuda"`` literals, dtype checks by type
name, and a few fused paths. Each patch below removes one such assumption; together they let
TP, EP, PP, SP, activation recompute, routing replay, the distributed optimizer and
dist-checkpointing run on CPU ranks (each patch was shown necessary by removing it).

``apply()`` is called explicitly. Each patch states when it is needed: most only when CUDA is
absent; one (a Megatron-Core 0.16 bug) whenever TransformerEngine is absent, GPU or not. On a
GPU machine with TransformerEngine nothing here runs. Every patch names the Megatron attributes it replaces and checks they exist before
touching anything, so a Megatron-Core upgrade that moves one fails with the patch's name
instead of misbehaving (``check_targets()`` is what the guard test runs).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch


class CompatError(RuntimeError):
    """A patch's target is missing from the installed Megatron-Core."""


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    targets: tuple[str, ...]  # "module:attribute" that must exist before patching
    apply: Callable[[], None]
    must_be_absent: tuple[str, ...] = ()  # attributes a fixed Megatron would define
    needed_without: str = "cuda"  # "cuda": CPU-only machines; "transformer_engine": any machine lacking TE


def _resolve(target: str):
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return module, attr


def _missing(targets: tuple[str, ...]) -> list[str]:
    return [t for t in targets if not hasattr(*_resolve(t))]


# -- RNG ------------------------------------------------------------------------------------

def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as rng

    rng._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    # The tracker warns each time the CPU RNG moves inside a fork, which on CPU is always.
    logging.getLogger(rng.__name__).setLevel(logging.ERROR)


# -- streams and events -----------------------------------------------------------------------

class _Stream:
    """Stand-in for torch.cuda.Stream: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        event = _Event()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event(_Stream):
    """Stand-in for torch.cuda.Event that measures wall time (elapsed_time in ms)."""

    def __init__(self, *args, **kwargs):
        self.time = None

    def record(self, *args, **kwargs):
        self.time = time.perf_counter()

    def elapsed_time(self, end: "_Event") -> float:
        return (end.time - self.time) * 1e3


_DEFAULT_STREAM = _Stream()


def _patch_streams() -> None:
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: _Stream()
    torch.cuda.synchronize = lambda device=None: None


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


# -- masks ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


@functools.lru_cache(maxsize=32)
def _sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    q = torch.arange(sq).unsqueeze(1) + (skv - sq)
    k = torch.arange(skv).unsqueeze(0)
    allowed = k <= q
    if window_size[0] >= 0:
        allowed &= k >= q - window_size[0]
    return ~allowed


def _patch_masks() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_mask


# -- norms under sequence parallelism ----------------------------------------------------------

def _torch_norm(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
    if config.layernorm_zero_centered_gamma:
        raise ValueError("zero-centred gamma needs TransformerEngine or Apex norms")
    norm_class = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
    norm = norm_class(normalized_shape=hidden_size, eps=eps)
    for param in norm.parameters():
        # Marked like TE/Apex norms so finalize_model_grads all-reduces their grads over TP.
        param.sequence_parallel = config.sequence_parallel
    return norm


def _patch_sequence_parallel_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    WrappedTorchNorm.__new__ = _torch_norm


# -- MoE --------------------------------------------------------------------------------------

def _patch_router_gemm() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    moe_utils.te_general_gemm = None


def _patch_alltoall_split_sizes() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = move


# -- device="cuda" literals and type-name checks ------------------------------------------------

def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    return device


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites ``device=`` arguments naming CUDA to CPU, and makes ``Tensor.cuda()`` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu(kwargs["device"])}
        if func is torch.Tensor.to and len(args) > 1 and not torch.is_tensor(args[1]):
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaToCpu | None = None


def _patch_cuda_literals() -> None:
    global _MODE
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # for the rest of the process, on this (the main) thread


def _patch_tensor_type_names() -> None:
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name


PATCHES: tuple[Patch, ...] = (
    Patch("rng", "the tensor-parallel RNG tracker saves and restores CUDA RNG states",
          ("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
           "megatron.core.tensor_parallel.random:_set_cuda_rng_state"), _patch_rng),
    Patch("streams", "MoE dispatch, optimizers and timers use CUDA streams and events", (), _patch_streams),
    Patch("current_device", "buffers are created with device=torch.cuda.current_device()", (), _patch_current_device),
    Patch("masks", "default causal and sliding-window masks are built on device='cuda'",
          ("megatron.core.transformer.utils:get_default_causal_mask",
           "megatron.core.fusions.fused_softmax:get_default_causal_mask"), _patch_masks),
    Patch("sequence_parallel_norm", "torch norms refuse sequence parallelism, which MoE under TP requires",
          ("megatron.core.transformer.torch_norm:WrappedTorchNorm",), _patch_sequence_parallel_norm),
    Patch("router_gemm", "0.16 references te_general_gemm even without TransformerEngine (NameError)",
          ("megatron.core.transformer.moe.moe_utils:topk_routing_with_score_function",), _patch_router_gemm,
          must_be_absent=("megatron.core.transformer.moe.moe_utils:te_general_gemm",),
          needed_without="transformer_engine"),
    Patch("alltoall_split_sizes", "gloo's all_to_all_single needs split sizes as lists, not CPU tensors",
          ("megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu",
           "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu"), _patch_alltoall_split_sizes),
    Patch("cuda_literals", "pipeline schedules and optimizers allocate with device='cuda'", (), _patch_cuda_literals),
    Patch("tensor_type_names", "optimizers check param.type() == 'torch.cuda.FloatTensor'", (), _patch_tensor_type_names),
)

_applied: list[str] = []


def check_targets() -> dict[str, list[str]]:
    """Per patch, the Megatron attributes it needs that are missing (empty lists when all is well).

    ``must_be_absent`` entries present in Megatron are reported too: the bug the patch works
    around is fixed, and the patch should go.
    """
    problems = {}
    for patch in PATCHES:
        if patch.name in _applied:  # its own changes would read as upstream ones
            problems[patch.name] = []
            continue
        missing = _missing(patch.targets)
        fixed = [t for t in patch.must_be_absent if hasattr(*_resolve(t))]
        problems[patch.name] = missing + [f"{t} now exists (upstream fix; drop this patch)" for t in fixed]
    return problems


def needed() -> list[Patch]:
    """The patches this machine needs: CPU ones without CUDA, TE ones without TransformerEngine."""
    missing = {"cuda": not torch.cuda.is_available(),
               "transformer_engine": importlib.util.find_spec("transformer_engine") is None}
    return [patch for patch in PATCHES if missing[patch.needed_without]]


def apply() -> list[str]:
    """Apply each needed patch once; return the names applied so far."""
    wanted = needed()
    problems = check_targets()
    broken = {p.name: problems[p.name] for p in wanted if problems[p.name]}
    if broken:
        details = "; ".join(f"{name}: {', '.join(issues)}" for name, issues in broken.items())
        raise CompatError(f"Megatron-Core compatibility patches no longer fit the installed version: {details}")
    for patch in wanted:
        if patch.name not in _applied:
            patch.apply()
            _applied.append(patch.name)
    return list(_applied)
