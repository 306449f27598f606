"""Make PyPI's torchvision importable beside a CPU build of torch.

PyPI ships torchvision as a CUDA build. Beside CPU torch its C extension cannot load, and its
Python side then fails at import on ``register_fake("torchvision::nms")`` because the op was
never defined; transformers imports torchvision whenever it is installed (sglang needs it).
Defining the two op schemas first (no kernels) lets the import succeed; nothing we run calls
those ops. Called explicitly by the entry points that import transformers, never at import.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

_library = None


def ensure_importable() -> None:
    global _library
    if _library is not None or "torchvision" in sys.modules or torch.version.cuda is not None:
        return
    if importlib.util.find_spec("torchvision") is None:
        return
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
