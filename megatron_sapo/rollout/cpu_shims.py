"""Import-time shims that let SGLang 0.5.23 serve on a machine without CUDA.

Nothing in SGLang is patched on disk. A server launched by :mod:`megatron_sapo.rollout.server`
on a CPU-only machine gets ``cpu_shim/`` (a ``sitecustomize`` that calls :func:`install`) on its
``PYTHONPATH``, so the server and every process it spawns install one import hook that:

- provides ``sgl_kernel`` when it is not installed: no CPU wheel exists on PyPI, and on a CPU
  without AMX SGLang's CPU path only imports it. Every kernel attribute is a function that
  raises, so a kernel that is really needed fails loudly by name instead of running wrong;
- defines the two torchvision op schemas before torchvision imports (PyPI's torchvision is a
  CUDA build; see :mod:`megatron_sapo.torchvision_compat`);
- gives SGLang's host-memory pool a "cpu" allocator, which ``--enable-return-routed-experts``
  needs (SGLang only knows page-locked CUDA host memory there);
- honours per-request ``sampling_seed``. SGLang reads it only under
  ``--enable-deterministic-inference``, which refuses the torch-native attention backend that
  CPU serving uses. Its torch sampler already draws seeded Gumbel noise hashed from (seed,
  position) whenever the batch carries seeds, so the shim fills them in: the request's own seed,
  or for a request without one a random seed drawn once and kept for its lifetime. Seeded
  samples then no longer depend on which other requests share the batch, which makes rollouts,
  and so resumed training runs, reproducible on CPU.

On machines with CUDA none of this is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import random
import sys
import types

# sgl_kernel submodules SGLang imports on its CPU path.
_KERNEL_SUBMODULES = ("kvcacheio", "flash_attn", "quantization", "elementwise", "allreduce", "moe",
                      "sampling", "utils")
# Ops that some SGLang model files look up in ``torch.ops.sgl_kernel`` at import time on the CPU
# path; only their schemas must exist.
_KERNEL_OP_SCHEMAS = ("fused_sigmoid_mul_cpu", "fused_moe_router_cpu", "fused_qk_gemma_rmsnorm_cpu",
                      "fused_qk_gemma_rmsnorm_with_gate_cpu", "fused_input_proj_cpu",
                      "fused_qkvzba_split_reshape_cat_contiguous_cpu", "fused_dual_residual_rmsnorm_cpu",
                      "rmsnorm_cpu", "gelu_and_mul_cpu")
_HOST_POOL_MODULE = "sglang.srt.mem_cache.pool_host.common"
_SAMPLING_INFO_MODULE = "sglang.srt.sampling.sampling_batch_info"
_installed = False
_op_library = None


def _missing_kernel(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this machine has no CUDA and no CPU build of sgl-kernel")

    kernel.__name__ = name
    return kernel


class _KernelModule(types.ModuleType):
    """A module whose every public attribute is a kernel that raises when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_kernel(name)


class _NoAttributes(types.ModuleType):
    """A module with no attributes, so ``from sgl_kernel.x import y`` raises ImportError and
    SGLang takes its own fallback."""

    def __getattr__(self, name: str):
        raise AttributeError(name)


def _build_sgl_kernel() -> types.ModuleType:
    global _op_library
    import torch

    root = _KernelModule("sgl_kernel")
    root.__version__ = "0.0.0+cpu-standin"
    root.__path__ = []
    for sub in _KERNEL_SUBMODULES:
        sys.modules[f"sgl_kernel.{sub}"] = _KernelModule(f"sgl_kernel.{sub}")
    sys.modules["sgl_kernel.scalar_type"] = _NoAttributes("sgl_kernel.scalar_type")
    _op_library = torch.library.Library("sgl_kernel", "DEF")
    for op in _KERNEL_OP_SCHEMAS:
        _op_library.define(f"{op}(Tensor x) -> ()")
    _op_library.define("murmur_hash32_cpu(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor")
    _op_library.impl("murmur_hash32_cpu", murmur_hash32, "CPU")
    return root


_U32 = 0xFFFFFFFF


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _U32


def _murmur3_mix(h, k):
    # int64 products wrap, but only their low 32 bits are kept, which wrapping preserves.
    k = _rotl32((k * 0xCC9E2D51) & _U32, 15)
    k = (k * 0x1B873593) & _U32
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _U32


def _murmur3_finish(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def murmur_hash32(seed, positions, col_indices):
    """MurmurHash3 (32-bit) of the 16 bytes (seed, position, column) for every row and column:
    ``[n] x [n] x [m] -> [n, m]`` values in ``[0, 2**32)`` (int64). SGLang's seeded sampler turns
    them into Gumbel noise; this is the CPU kernel sgl-kernel would provide."""
    import torch

    seed = seed.to(torch.int64).unsqueeze(1)
    h = torch.zeros_like(seed)
    h = _murmur3_mix(h, seed & _U32)
    h = _murmur3_mix(h, (seed >> 32) & _U32)
    h = _murmur3_mix(h, positions.to(torch.int64).unsqueeze(1) & _U32)
    h = _murmur3_mix(h, col_indices.to(torch.int64).unsqueeze(0) & _U32)
    return _murmur3_finish(h ^ 16)


def _add_cpu_host_allocator(module: types.ModuleType) -> None:
    def allocate_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
        return allocator.allocate(dims, dtype=dtype, device=device)

    module.ALLOC_MEMORY_FUNCS.setdefault("cpu", allocate_unpinned)


def _seed_every_request(module: types.ModuleType) -> None:
    cls = module.SamplingBatchInfo
    build = cls.from_schedule_batch.__func__

    def from_schedule_batch(klass, batch, vocab_size):
        info = build(klass, batch, vocab_size)
        if info.sampling_seed is None:
            import torch

            seeds = []
            for req in batch.reqs:
                params = req.sampling_params
                if params.sampling_seed is None:
                    params.sampling_seed = random.getrandbits(62)
                seeds.append(params.sampling_seed)
            info.sampling_seed = torch.tensor(seeds, dtype=torch.int64, device=batch.device)
        return info

    cls.from_schedule_batch = classmethod(from_schedule_batch)


_POST_IMPORT_PATCHES = {
    _HOST_POOL_MODULE: _add_cpu_host_allocator,
    _SAMPLING_INFO_MODULE: _seed_every_request,
}


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _build_sgl_kernel()

    def exec_module(self, module):
        pass


class _ShimFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._resolving = False

    def find_spec(self, name, path=None, target=None):
        if self._resolving:
            return None
        if name == "torchvision":
            self._define_torchvision_ops()
            return None
        if name == "sgl_kernel":
            real = self._find_elsewhere(name)
            return real or importlib.machinery.ModuleSpec(name, _StandInLoader(), is_package=True)
        if name in _POST_IMPORT_PATCHES:
            spec = self._find_elsewhere(name)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterExec(spec.loader, _POST_IMPORT_PATCHES[name])
            return spec
        return None

    def _define_torchvision_ops(self) -> None:
        from megatron_sapo import torchvision_compat

        self._resolving = True
        try:
            torchvision_compat.ensure_importable()
        finally:
            self._resolving = False

    def _find_elsewhere(self, name):
        self._resolving = True
        try:
            return importlib.util.find_spec(name)
        finally:
            self._resolving = False


class _PatchAfterExec(importlib.abc.Loader):
    def __init__(self, loader, patch) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


def install() -> None:
    """Install the import hook (idempotent). Call only where CUDA is absent."""
    global _installed
    if not _installed:
        sys.meta_path.insert(0, _ShimFinder())
        _installed = True
