"""Read Hugging Face safetensors checkpoints one tensor at a time (never a whole file).

Tensors are read with plain file reads at the offsets the safetensors header gives, not through
a memory map: mapped pages of every file touched would count as resident memory for as long
as the files stay open, so a long conversion would appear to hold the whole model.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json", "tokenizer.model",
                   # A vision model's image/video processor (one file or, in older layouts, two).
                   "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the file offset where tensor data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, processor and generation files present in ``src``; return their names."""
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
            self.files = {name: self.dir / SINGLE_FILE for name in read_header(self.dir / SINGLE_FILE)[0]}
        else:
            raise FileNotFoundError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        for path in sorted(set(self.files.values())):
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
        self._headers: dict[Path, tuple[dict, int]] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name``, from the file's header (no tensor data is read)."""
        return tuple(self._entry(name)[1]["shape"])

    def get(self, name: str) -> torch.Tensor:
        path, info, data_start = self._entry(name)
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{path}: tensor {name!r} is truncated")
        if not buffer:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return torch.frombuffer(buffer, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        """The file holding ``name``, its header entry, and where the file's tensor data starts."""
        try:
            path = self.files[name]
        except KeyError:
            raise KeyError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        if path not in self._headers:
            self._headers[path] = read_header(path)
        header, data_start = self._headers[path]
        if name not in header:
            raise KeyError(f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in the file")
        return path, header[name], data_start
