"""Make PyPI's torchvision importable beside a CPU build of torch.

PyPI ships torchvision as a CUDA build. Beside CPU torch its C extension cannot load, and its
Python side then fails at import on ``register_fake("torchvision::nms")`` because the op was
never defined; transformers imports torchvision whenever it is installed (sglang needs it).
Defining the two op schemas first (no kernels) lets the import succeed; nothing we run calls
those ops.

Two ways in: the entry points that import transformers call :func:`ensure_importable`; and
``tools/setup_env.sh`` puts a ``.pth`` file into the virtualenv that calls
:func:`install_import_hook` when Python starts, so a plain ``python -c "import torchvision"``
(or ``from transformers import Qwen3MoeForCausalLM``) works there too, with nothing of ours
imported first. The hook imports nothing until torchvision is imported, then defines the
schemas and steps aside.
"""

from __future__ import annotations

import importlib.util
import sys

_library = None


def ensure_importable() -> None:
    global _library
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]  # done once
    import torch

    if _library is not None or "torchvision" in sys.modules or torch.version.cuda is not None:
        return
    if importlib.util.find_spec("torchvision") is None:
        return
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision:
    """A ``sys.meta_path`` entry that runs :func:`ensure_importable` when torchvision is first
    imported, then removes itself (finding nothing: the import proceeds as usual)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            ensure_importable()  # which removes this hook first
        return None


def install_import_hook() -> None:
    """Called from the virtualenv's ``.pth`` file at start-up (cheap: imports nothing)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
