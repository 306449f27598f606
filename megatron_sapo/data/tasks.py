"""Every built-in task by name: the text tasks of ``synthetic`` and the image tasks of
``synthetic_vl``, which builds on ``synthetic``. The registry sits above both, so neither
module imports the other in a cycle."""

from __future__ import annotations

from megatron_sapo.data.synthetic import TASKS as TEXT_TASKS
from megatron_sapo.data.synthetic import SyntheticTask
from megatron_sapo.data.synthetic_vl import IMAGE_TASKS, ImageTask
from megatron_sapo.errors import InputError

TASKS: dict[str, SyntheticTask | ImageTask] = {**TEXT_TASKS, **IMAGE_TASKS}


def get_task(name: str) -> SyntheticTask | ImageTask:
    """A built-in task by name (``data.task``)."""
    if name not in TASKS:
        raise InputError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "get_task"]
