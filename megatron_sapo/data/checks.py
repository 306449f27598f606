"""A config's data names against the registries of ``data/``: the task and the reward exist, and
a task with images meets a model that reads them. ``config_file.config_from_dict`` runs it when
a config is loaded, so a misspelt name fails before anything starts; ``config.py`` itself
imports nothing of ``data/`` (it sits below it).

A reward given as ``file.py:function`` or ``module:function`` is loaded here, so a missing file or
function, or one that cannot take (response, answer, fields), fails with the config's error.
"""

from __future__ import annotations

from megatron_sapo.config import VISION_BUILTIN_MODELS, ConfigError, DataConfig, RunConfig
from megatron_sapo.data.rewards import get_reward
from megatron_sapo.data.tasks import get_task


def check_data(cfg: RunConfig) -> None:
    data = cfg.data
    named = [("data.task", get_task, data.task), ("data.reward", get_reward, data.reward)]
    named += [(f"eval.sets[{s.name!r}].reward", get_reward, s.reward) for s in cfg.eval.sets]
    for key, lookup, name in named:
        try:
            if name is not None:
                lookup(name)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    task = get_task(data.task) if data.task is not None else None
    if task is not None and task.has_images and cfg.model.builtin is not None \
            and cfg.model.builtin not in VISION_BUILTIN_MODELS:
        raise ConfigError(f"data.task = {data.task!r} has images, which model.builtin = {cfg.model.builtin!r} "
                          f"cannot read (use one of {', '.join(VISION_BUILTIN_MODELS)})")


def reward_name(data: DataConfig) -> str:
    """The reward function in use: ``data.reward``, else the task's verifier, else "math"."""
    if data.reward is not None:
        return data.reward
    return get_task(data.task).reward if data.task is not None else "math"


__all__ = ["check_data", "reward_name"]
