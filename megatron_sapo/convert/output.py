"""Output folders that appear whole or not at all.

Every writer fills ``.NAME.partial`` beside the target and renames it at the end, so a crash
never leaves a half checkpoint under the final name; an existing target needs ``force``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")


def partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def partial_dir(out: Path) -> Path:
    """A fresh, empty ``.NAME.partial`` folder beside ``out``."""
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place, replacing ``out`` (the caller checked ``force``)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
