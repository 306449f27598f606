"""Streaming conversion between HF safetensors and Megatron-Core torch_dist checkpoints.

Megatron's torch_dist checkpoints are PyTorch distributed checkpoints (DCP) in which every key
holds a *global* tensor, stored as chunks (one per layer tensor, per expert, per GLU half).
That layout does not depend on how the model was split, so a checkpoint written as if from a
single TP1/PP1/EP1 rank loads at any TP/PP/EP. One exception: the embedding and output
matrices are padded to a multiple of 128 x TP rows, so their row count is the saving layout's.
Megatron marks those keys ``allow_shape_mismatch`` and, on load, copies the rows both sizes share.

Neither direction ever holds the model:

* HF -> Megatron: the model is built on the ``meta`` device (no memory), and its own
  ``sharded_state_dict()`` lists every key and chunk. DCP then writes the chunks one at a time,
  asking our planner's ``resolve_data`` for each; it reads the HF tensors behind that chunk
  and applies the table's transform. The chunks go to one file per layer (``_FilePerGroupWriter``).
  Peak memory: the parameter being written, its HF sources, and one layer's last chunks.
* Megatron -> HF: keys are read one at a time with DCP (one global tensor, at most one layer's
  experts) and turned into HF tensors written into size-capped safetensors files. Each key is
  read at the shape the checkpoint stores (its metadata says), not at the TP1 layout's: a
  padded vocabulary key saved at TP=2 has more rows, all read, then cut to ``vocab_size``.

Both directions build the model with the layer spec the caller resolved
(``megatron_sapo.models.use_transformer_engine``): in Megatron-Core 0.16.1 the local and
TransformerEngine specs store some weights under different keys (a MoE layer's pre-MLP norm)
and TE adds extra state, so a checkpoint is written, and read back, with the keys of the spec
that will load it.

Both directions work for every model family (``megatron_sapo.models.model_family``). Where the
Hub stores a layer's experts fused (Qwen3-VL-MoE), HF tensors are read and written through
``hf_layout.py``: a fused tensor is read once per layer, and written once all of the layer's
experts are in, which the key order above (a layer's experts under one key) makes immediate.
"""

from __future__ import annotations

import ctypes
import io
import json
import queue
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert.export import ShardWriter, finish_export
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint, copy_tokenizer_files
from megatron_sapo.convert.hf_layout import fuse_experts, logical_view
from megatron_sapo.convert.mapping import MappingTable
from megatron_sapo.convert.mcore_checkpoint import HF_CONFIG_FILE
from megatron_sapo.convert.output import check_target, partial_dir, publish
from megatron_sapo.errors import InputError
from megatron_sapo.models import model_family, weight_table

if TYPE_CHECKING:  # annotations only
    from megatron_sapo.models.qwen3_moe import Qwen3MoeSpec
    from megatron_sapo.models.qwen3_vl import Qwen3VLSpec

MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}


def release_large_buffers_to_os(threshold: int = 1 << 20) -> None:
    """Pin glibc's mmap threshold so every buffer above ``threshold`` is returned to the OS when freed.

    glibc raises the threshold dynamically after large frees, after which the many few-MB
    expert buffers of a conversion come from the heap and fragment it: measured on a
    30B-A3B-shaped checkpoint, peak RSS then grows with the layer count. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold)


@contextmanager
def single_rank_group():
    """A private one-rank gloo group when none exists (Megatron modules need one to build)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a checkpoint key: where it sits in the key's global tensor, and
    which region of which model parameter it is."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    param: str
    prepended: int  # leading axes (layer/expert) that are not the parameter's own
    padded_rows: bool = False
    """Megatron's ``allow_shape_mismatch``: the parameter's first own axis is the padded
    vocabulary, whose size depends on the TP size the checkpoint was saved at."""

    def param_region(self) -> tuple[slice, ...]:
        own = zip(self.offsets[self.prepended:], self.sizes[self.prepended:])
        return tuple(slice(o, o + s) for o, s in own)


@dataclass(frozen=True)
class MetaLayout:
    """The model at TP1/PP1/EP1, described without memory: what conversion needs to know of it."""

    spec: Qwen3MoeSpec | Qwen3VLSpec
    """The family's model spec."""
    table: MappingTable
    """Its weight table, with the Hub storage of its experts."""
    chunks: list[Chunk]
    objects: list
    """Megatron's sharded objects (non-tensor state), written as they are."""


def meta_layout(hf_config: dict, dtype: torch.dtype, source: str = "config.json", *,
                use_te: bool = False) -> MetaLayout:
    """The model of ``hf_config`` (read from ``source``) at TP1/PP1/EP1 on the meta device, with
    the TransformerEngine layer spec when ``use_te``."""
    from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel

    parallel = ParallelConfig()
    pg = initialize_model_parallel(parallel)
    try:
        return _describe_model(hf_config, source, parallel, pg, dtype, use_te)
    finally:
        destroy_model_parallel()


def _describe_model(hf_config: dict, source: str, parallel: ParallelConfig, pg, dtype: torch.dtype,
                    use_te: bool) -> MetaLayout:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    family = model_family(hf_config, source)
    spec = family.from_hf_config(hf_config, parallel, params_dtype=dtype, use_te=use_te)
    for config in transformer_configs(spec):
        config.perform_initialization = False
        # The GPU path names device=cuda, escaping the meta context. TE modules name "cpu" here
        # instead, so with TE their weights are allocated on the CPU (uninitialised), not on meta.
        config.use_cpu_initialization = True
    with torch.device("meta"):
        model = family.build_model(spec, pg, use_te=use_te)
    chunks, objects = [], []
    for param_name, entry in model.sharded_state_dict().items():
        for item in _flatten(entry):
            if isinstance(item, ShardedObject):
                objects.append(item)
            elif isinstance(item, ShardedTensor):
                # local_shape leaves out the prepended axes, where a chunk is one index wide.
                sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
                chunks.append(Chunk(item.key, tuple(item.global_shape), tuple(item.global_offset), sizes,
                                    param_name, item.prepend_axis_num, item.allow_shape_mismatch))
            else:
                raise TypeError(f"{param_name}: unexpected sharded state dict entry {type(item).__name__}")
    missing = {name for name, _ in model.named_parameters()} - {c.param for c in chunks}
    if missing:
        raise RuntimeError(f"Megatron's sharded state dict has no chunk for {sorted(missing)}")
    return MetaLayout(spec, weight_table(family, spec), chunks, objects)


def transformer_configs(spec) -> list:
    """Every TransformerConfig a model is built from: the text model's, and a vision tower's."""
    vision = getattr(spec, "vision", None)
    return [spec.config] + ([vision.config] if vision is not None else [])


def _flatten(entry):
    """ShardedTensor / ShardedObject leaves of a state-dict entry (factories built, lists walked)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        entry = entry.build()
    if isinstance(entry, dict):
        entry = list(entry.values())
    if isinstance(entry, (list, tuple)):
        return [leaf for item in entry for leaf in _flatten(item)]
    return [entry]


class _LazyHFPlanner(DefaultSavePlanner):
    """Plans every chunk up front from metadata; produces each tensor only when DCP writes it."""

    def __init__(self, chunks, objects, resolve_param, dtype):
        super().__init__(dedup_replicated_tensors=False)
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
        self._objects = {o.unique_key: o for o in objects}
        self._resolve_param = resolve_param
        self._dtype = dtype
        self._cached: tuple[str, torch.Tensor] | None = None

    def create_local_plan(self) -> SavePlan:
        properties = TensorProperties(dtype=self._dtype)
        items = [
            WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                properties=properties, size=torch.Size(c.global_shape)))
            for index, c in self._chunks.items()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            # Megatron stores a list of the data of all objects sharing one unique key.
            torch.save([self._objects[write_item.index.fqn].data], buffer)
            buffer.seek(0)
            return buffer
        chunk = self._chunks[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        if self._cached is None or self._cached[0] != chunk.param:
            self._cached = (chunk.param, self._resolve_param(chunk.param))
        return self._cached[1][chunk.param_region()].reshape(chunk.sizes).contiguous()


_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def file_group(key: str) -> str:
    """The checkpoint file a key is written to: its layer's (``decoder.layers.3``) or its own."""
    match = _LAYER_PREFIX.match(key)
    return match.group(1) if match else key


class _FilePerGroupWriter(dcp.FileSystemWriter):
    """torch's file-system writer, writing one file per ``file_group`` in turn.

    While it writes a file, torch's writer keeps the last tensor written under each key until
    the file is closed (it needs them for its safetensors format). In one file per rank, that
    is every layer's attention weights and the embedding, to the end: peak memory grew by
    ~42 MiB per 30B-A3B layer. Per layer, it is one layer's.
    """

    def __init__(self, path: Path):
        super().__init__(str(path), single_file_per_rank=True, thread_count=1)

    def write_data(self, plan: SavePlan, planner):
        groups: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            groups.setdefault(file_group(item.index.fqn), []).append(item)
        files: queue.Queue = queue.Queue()
        for i, items in enumerate(groups.values()):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)


def hf_to_mcore(hf_dir: Path, out: Path, hf_config: dict, dtype: torch.dtype, *, force: bool = False,
                progress=None, use_te: bool = False) -> Path:
    """Write a torch_dist checkpoint of the HF model, one chunk in memory at a time, with the
    keys of the TransformerEngine layer spec when ``use_te``, else the local spec's."""
    check_target(out, force)
    release_large_buffers_to_os()
    with single_rank_group():
        layout = meta_layout(hf_config, dtype, str(hf_dir / "config.json"), use_te=use_te)
        table, chunks, objects = layout.table, layout.chunks, layout.objects
        # Fused experts are read once per layer (the view keeps that layer's fused tensors).
        checkpoint = logical_view(HFCheckpoint(hf_dir), table.fused_experts)

        def resolve_param(name: str) -> torch.Tensor:
            match = table.match(name)
            tensors = tuple(checkpoint.get(n) for n in match.entry.hf_names(match.layer, match.expert))
            if progress is not None:
                progress.update(len(tensors))
            return match.entry.transform.to_megatron(tensors).to(dtype)

        tmp = partial_dir(out)
        planner = _LazyHFPlanner(chunks, objects, _checked(resolve_param, chunks, hf_dir), dtype)
        writer = _FilePerGroupWriter(tmp)
        try:
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            exc, _trace = next(iter(err.failures.values()))
            raise exc from None
    torch.save({}, tmp / "common.pt")
    (tmp / "metadata.json").write_text(json.dumps(MCORE_METADATA))
    (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    copy_tokenizer_files(hf_dir, tmp)
    publish(tmp, out)
    return out


def param_shapes(chunks: list[Chunk]) -> dict[str, tuple[int, ...]]:
    """Each Megatron parameter's full (TP1/EP1) shape: the extent its chunks cover."""
    shapes: dict[str, tuple[int, ...]] = {}
    for c in chunks:
        own = tuple(o + s for o, s in zip(c.offsets[c.prepended:], c.sizes[c.prepended:]))
        shapes[c.param] = tuple(max(a, b) for a, b in zip(shapes.get(c.param, own), own))
    return shapes


def _checked(resolve_param, chunks, hf_dir: Path):
    """Wrap the resolver with a shape check naming the checkpoint and the parameter."""
    expected = param_shapes(chunks)

    def resolve(name):
        tensor = resolve_param(name)
        if tuple(tensor.shape) != expected[name]:
            raise InputError(f"{hf_dir}: {name}: the HF tensors give shape {tuple(tensor.shape)}, "
                             f"config.json implies {expected[name]}")
        return tensor

    return resolve


def mcore_to_hf(ckpt: Path, out: Path, hf_config: dict, dtype: torch.dtype, *, max_shard_bytes: int,
                force: bool = False, progress=None, use_te: bool = False) -> Path:
    """Write the HF layout of a torch_dist checkpoint, one checkpoint key in memory at a time;
    ``use_te``: the checkpoint has the TransformerEngine layer spec's keys."""
    check_target(out, force)
    release_large_buffers_to_os()
    with single_rank_group():
        layout = meta_layout(hf_config, dtype, str(ckpt / HF_CONFIG_FILE), use_te=use_te)
    spec, table, chunks = layout.spec, layout.table, layout.chunks
    by_param: dict[str, list[Chunk]] = {}
    first_seen: dict[str, int] = {}
    for c in chunks:
        by_param.setdefault(c.param, []).append(c)
        first_seen.setdefault(c.key, len(first_seen))
    # All parameters stored under one key (e.g. a layer's experts) are read from one load.
    ordered = sorted(by_param.items(), key=lambda item: first_seen[item[1][0].key])

    # Every key is checked before anything is written, so a mismatched checkpoint fails at once.
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    shapes = {c.key: _stored_shape(ckpt, stored, c, spec.vocab_size) for c in chunks}

    tmp = partial_dir(out)
    writer = ShardWriter(tmp, "part", max_shard_bytes)
    # Fused experts: each layer's experts become one Hub tensor once all of them are read.
    logical = _hf_tensors(ckpt, ordered, shapes, table, dtype, progress)
    for name, tensor in fuse_experts(logical, table.fused_experts):
        writer.add(name, tensor)
    writer.flush()
    finish_export(tmp, out, [(writer.files, writer.weight_map, writer.total_bytes)], hf_config, ckpt)
    return out


def _hf_tensors(ckpt: Path, ordered, shapes: dict, table: MappingTable, dtype: torch.dtype, progress):
    """``(name, tensor)`` under the table's logical names, parameter by parameter, each key read once."""
    loaded: tuple[str, torch.Tensor] | None = None
    for param, param_chunks in ordered:
        key = param_chunks[0].key
        if loaded is None or loaded[0] != key:
            loaded = (key, _read_key(ckpt, key, shapes[key], dtype))
        full = loaded[1][tuple(slice(o, o + 1) for o in param_chunks[0].offsets[:param_chunks[0].prepended])]
        full = full.reshape(full.shape[param_chunks[0].prepended:])
        match = table.match(param)
        for name, tensor in zip(match.entry.hf_names(match.layer, match.expert), match.entry.transform.to_hf(full)):
            # A copy, so the shard being filled never pins the whole key's tensor.
            yield name, tensor.to(dtype, copy=True)
            if progress is not None:
                progress.update(1)


def _stored_shape(ckpt: Path, stored: dict, chunk: Chunk, vocab_size: int) -> tuple[int, ...]:
    """The global shape under which ``ckpt`` stores ``chunk.key``, checked against the TP1 layout.

    Only a padded-vocabulary key may differ, and only in its row count, which must cover
    ``vocab_size``: a checkpoint saved at TP=2 stores 512 rows of the tiny model's 301-token
    vocabulary where the TP1 layout has 384.
    """
    entry = stored.get(chunk.key)
    if entry is None:
        raise InputError(f"{ckpt}: no tensor {chunk.key!r}, which the model in {HF_CONFIG_FILE} has")
    if not isinstance(entry, TensorStorageMetadata):
        raise InputError(f"{ckpt}: {chunk.key!r} is stored as an object, not as a tensor")
    shape, expected = tuple(entry.size), chunk.global_shape
    if shape == expected:
        return shape
    rows = chunk.prepended
    if (chunk.padded_rows and len(shape) == len(expected) and shape[rows] >= vocab_size
            and shape[:rows] + shape[rows + 1:] == expected[:rows] + expected[rows + 1:]):
        return shape
    limit = ""
    if chunk.padded_rows:
        limit = f"; only its row count may differ, and be at least vocab_size={vocab_size}"
    raise InputError(f"{ckpt}: tensor {chunk.key!r} has shape {shape}; the model in {HF_CONFIG_FILE} "
                     f"implies {expected}{limit}")


def _read_key(ckpt: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    state = {key: torch.empty(shape, dtype=dtype)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    return state[key]
