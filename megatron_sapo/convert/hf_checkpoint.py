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

from megatron_sapo.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json", "tokenizer.model",
                   # A vision model's image/video processor (one file or, in older layouts, two).
                   "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsError(InputError):
    """A safetensors file that cannot be read; the message names the file and what is wrong."""


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the file offset where tensor data starts; a
    ``SafetensorsError`` naming the file, and the tensor where one is at fault, when the header
    is truncated, not JSON, or describes tensors the file cannot hold."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                   "length)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise SafetensorsError(f"{path}: corrupt or truncated safetensors header (it claims {length} bytes; "
                                   f"the file has {size - 8} after the length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: corrupt safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in header.items():
        _check_entry(path, name, info, data_bytes)
    return header, 8 + length


def _check_entry(path: Path, name: str, info, data_bytes: int) -> None:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    numel = 1
    for n in shape:
        numel *= n
    if not 0 <= begin <= end <= data_bytes or end - begin != numel * dtype.itemsize:
        raise SafetensorsError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) has data offsets {[begin, end]} "
                               f"that do not fit its size or the file's {data_bytes} data bytes (truncated file?)")


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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: self.dir / file for name, file in weight_map.items()}
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise SafetensorsError(f"{index}: not a JSON object with a weight_map of tensor names to files "
                                       f"({type(err).__name__}: {err})") from None
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

    def check(self) -> None:
        """Read every file's header now: a corrupt or truncated file fails here, naming itself,
        before a command starts any work (``SafetensorsError``)."""
        for path in sorted(set(self.files.values())):
            if path not in self._headers:
                self._headers[path] = read_header(path)

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
                raise SafetensorsError(f"{path}: tensor {name!r} is truncated")
        if not buffer:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return torch.frombuffer(buffer, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        """The file holding ``name``, its header entry, and where the file's tensor data starts."""
        try:
            path = self.files[name]
        except KeyError:
            raise InputError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        if path not in self._headers:
            self._headers[path] = read_header(path)
        header, data_start = self._headers[path]
        if name not in header:
            raise SafetensorsError(f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in the file")
        return path, header[name], data_start
