"""Read Hugging Face safetensors checkpoints one tensor at a time (never a whole file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json", "tokenizer.model")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files present in ``src``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class HFCheckpoint:
    """Tensor name -> file, from the index (sharded) or the single ``model.safetensors``."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE_FILE).exists():
            with safe_open(self.dir / SINGLE_FILE, framework="pt") as f:
                self.files = {name: self.dir / SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        for path in sorted(set(self.files.values())):
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        try:
            path = self.files[name]
        except KeyError:
            raise KeyError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
