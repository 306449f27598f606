"""Prompt sets from JSONL and parquet files, and the order in which training visits them.

Choices:

* Malformed rows (invalid JSON, a missing field, a value of the wrong type) stop loading with
  one error that counts them and lists the first few with ``file:line`` (JSONL, 1-based lines)
  or ``file: row N`` (parquet, 0-based like pyarrow): a data bug is fixed once at the source
  rather than skipped at every run. Blank JSONL lines are not rows.
* Field names may be dotted to reach into nested objects (``reward_model.ground_truth``).
* Images of a multimodal problem sit in an optional field (``images`` unless configured): a
  list whose items are file paths (relative to the prompt file's folder, or absolute), raw
  bytes (parquet binary), or ``{"bytes": ..., "path": ...}`` objects (the parquet layout of
  Hugging Face datasets' image feature). Each is read and decoded once at load, so a missing
  or corrupt image is a load error naming its row, not a failure mid-run.
* The order is a stream of steps: epoch ``e`` is a permutation of the prompts drawn from
  ``(seed, e)``; each step takes the next ``prompts_per_step`` of it, and the tail that does not
  fill a step is dropped (a different tail each epoch), so a step never holds a prompt twice.
  Rank 0 samples every prompt of a step (the replicas get their rows after the rollout,
  ``training/shard.py``). The cursor is a step count, so a resumed run (at any data-parallel
  size) visits exactly the prompts the uninterrupted run would have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from megatron_sapo.config import DataConfig
from megatron_sapo.data.tasks import get_task
from megatron_sapo.data.records import (PromptRecord, answer_text, image_placement_problem, prompt_problem,
                                        short_repr)
from megatron_sapo.errors import InputError

PROMPT_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")
MAX_LISTED_PROBLEMS = 5


class MalformedRowsError(InputError):
    """Rows of a prompt file could not be read; the message lists where and why."""


def load_split(cfg: DataConfig, split: Literal["train", "val"]) -> list[PromptRecord]:
    """The training or validation problems the data config names (files or a synthetic task)."""
    if cfg.task is not None:
        return get_task(cfg.task).records(split, cfg.seed)
    path = cfg.train_path if split == "train" else cfg.val_path
    if path is None:
        raise InputError(f"data.val_path is not set, so there are no {split} prompts")
    return read_prompt_file(path, cfg.prompt_key, cfg.answer_key, cfg.image_key)


def read_prompt_file(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
                     image_key: str = "images") -> list[PromptRecord]:
    """Every row of a .jsonl or .parquet prompt file, or MalformedRowsError listing bad rows."""
    path = Path(path)
    if path.suffix not in PROMPT_FILE_SUFFIXES:
        raise InputError(f"{path}: prompt files must end in {' or '.join(PROMPT_FILE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    rows = (_jsonl_rows(path) if path.suffix == ".jsonl"
            else _parquet_rows(path, [prompt_key, answer_key]))
    records, problems = [], []
    for where, row, parse_error in rows:
        if parse_error:
            problems.append(f"{where}: {parse_error}")
            continue
        try:
            prompt, answer = _fields(row, prompt_key, answer_key)
            images = _images(row, image_key, path.parent)
            placement = image_placement_problem(prompt, len(images))
            if placement:
                raise InputError(f"field {image_key!r}: {placement}")
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        fields = {k: v for k, v in row.items() if k not in (prompt_key, answer_key, image_key)} \
            if isinstance(row, dict) else {}
        records.append(PromptRecord(index=len(records), prompt=prompt, answer=answer, source=where, images=images,
                                    fields=fields))
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        raise MalformedRowsError(f"{path}: {len(problems)} malformed row(s); the first:\n  {listed}")
    if not records:
        raise InputError(f"{path}: the file holds no prompts")
    return records


# Rows come as (where, parsed row, why it could not be parsed or None).
Row = tuple[str, object, str | None]


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield where, None, "not valid UTF-8"
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text.strip()), None
            except json.JSONDecodeError as err:
                yield where, None, f"invalid JSON ({err.msg} at column {err.colno})"


def _parquet_rows(path: Path, keys: list[str]) -> Iterator[Row]:
    """Every row, all columns (the reward function gets the row's other fields); the columns
    ``keys`` need must exist."""
    import pyarrow.parquet as pq

    available = pq.read_schema(path).names
    missing = [c for c in dict.fromkeys(key.split(".")[0] for key in keys) if c not in available]
    if missing:
        raise MalformedRowsError(f"{path}: no column {missing[0]!r} (columns: {', '.join(available)})")
    for number, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {number}", row, None


def _fields(row: object, prompt_key: str, answer_key: str) -> tuple[object, str]:
    if not isinstance(row, dict):
        raise InputError(f"expected an object, got {type(row).__name__}")
    prompt = _lookup(row, prompt_key)
    problem = prompt_problem(prompt)
    if problem:
        raise InputError(f"field {prompt_key!r}: {problem}")
    answer = answer_text(_lookup(row, answer_key))
    if answer is None:
        raise InputError(f"field {answer_key!r} must be a string or a number, got {_lookup(row, answer_key)!r}")
    return prompt, answer


def _images(row: dict, image_key: str, folder: Path) -> tuple[bytes, ...]:
    """The row's images as encoded files, each checked to decode; () when the field is absent."""
    try:
        value = _lookup(row, image_key)
    except ValueError:
        return ()
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError(f"field {image_key!r} must be a list of image files, got {short_repr(value)}")
    images = []
    for number, item in enumerate(value, start=1):
        data = _image_bytes(item, folder, f"field {image_key!r}, image {number}")
        _check_decodes(data, f"field {image_key!r}, image {number}")
        images.append(data)
    return tuple(images)


def _image_bytes(item: object, folder: Path, what: str) -> bytes:
    if isinstance(item, dict):  # Hugging Face datasets' image struct: bytes if embedded, else a path
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str) and item:
        file = folder / item  # an absolute item replaces the folder
        if not file.is_file():
            raise InputError(f"{what}: no image file {item!r} (looked for {file})")
        return file.read_bytes()
    raise InputError(f"{what} must be a file path or bytes, got {short_repr(item)}")


def _check_decodes(data: bytes, what: str) -> None:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL reports truncation as SyntaxError too
        raise InputError(f"{what} is not a readable image ({type(err).__name__}: {err})") from None


def _lookup(row: dict, dotted: str) -> object:
    value: object = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise InputError(f"missing field {dotted!r}")
        value = value[part]
    return value


class PromptSampler:
    """Which prompt indices each step takes; resumable.

    See the module docstring for the order. ``state_dict`` holds the step count plus what
    defines the order, so loading it into a sampler of a different order is refused.
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, *, seed: int = 0, shuffle: bool = True):
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step = {prompts_per_step} must be >= 1")
        if num_prompts < prompts_per_step:
            raise InputError(f"the prompt set has {num_prompts} prompts, fewer than one step's {prompts_per_step} "
                             "(rollout.prompts_per_step)")
        self.num_prompts, self.prompts_per_step = num_prompts, prompts_per_step
        self.seed, self.shuffle = seed, shuffle
        self.step = 0  # steps taken so far: the cursor
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // self.prompts_per_step

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def next_indices(self) -> list[int]:
        """The prompt indices of the next step; advances the cursor."""
        start = (self.step % self.steps_per_epoch) * self.prompts_per_step
        indices = self._permutation(self.epoch)[start:start + self.prompts_per_step]
        self.step += 1
        return indices.tolist()

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts) if self.shuffle
                     else np.arange(self.num_prompts))
            self._order = (epoch, order)
        return self._order[1]

    def state_dict(self) -> dict:
        return {"step": self.step, "num_prompts": self.num_prompts, "prompts_per_step": self.prompts_per_step,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_prompts", "prompts_per_step", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise InputError(
                    f"cannot resume the prompt order: the saved {key} is {state[key]!r}, this run's is "
                    f"{getattr(self, key)!r}")
        self.step = int(state["step"])
