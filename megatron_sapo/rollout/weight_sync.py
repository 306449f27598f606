"""Megatron -> SGLang weight sync: gathered shards, HF names, bucketed pushes, weight versions.

Every path starts from :func:`megatron_sapo.convert.export.iter_hf_tensors`, the converter's
own walk of the model through the model's mapping table: each rank gathers its TP / expert-TP
shards and yields the HF tensors it owns (exactly one rank owns each). Tensors are grouped into
buckets of ``bucket_bytes`` and pushed by their owner, so no rank ever holds the whole model:

- ``tensor`` (colocated): each bucket is pickled and posted to ``/update_weights_from_tensor``;
  CUDA tensors travel as IPC handles (same machine; nothing copied), CPU tensors by value.
- ``distributed``: each owner rank opens its own update group with the servers' ranks
  (``/init_weights_update_group``; gloo on CPU, NCCL on GPUs), posts the bucket's names,
  dtypes and shapes to ``/update_weights_from_distributed`` and broadcasts the tensors. Owners
  may push concurrently; each server serves their requests one at a time. An owner is the
  group's master at its own address on the route to the servers (another node's, on a
  cluster) and a free port there. A server that restarted (it reports another weight version
  than the last one pushed) has left its groups: every owner then opens new ones.
- ``disk``: the converter's exporter writes an HF checkpoint (each rank its part) and the
  servers reload it with ``/update_weights_from_disk`` (shared storage; the fallback).

Names: the tensor and distributed paths send the weight table's logical names, experts one by
one (``...mlp.experts.{e}.gate_proj.weight``), also for Qwen3-VL-MoE, whose Hub checkpoints fuse
a layer's experts: SGLang 0.5.23's ``Qwen3VLMoeForConditionalGeneration.load_weights`` loads
per-expert names through its expert mapping, and fused names
(``...mlp.experts.gate_up_proj`` ``[E, H, 2I]``) through another that, once a request holds one
fused name, it applies to the rest of that request. Per-expert names therefore always load, need
no gathering of a layer's experts across expert-parallel ranks, and are never mixed with fused
ones. The disk path writes the Hub layout (fused where the Hub fuses), as any checkpoint.

Rank 0 brackets every sync with ``/begin_weight_update`` and ``/end_weight_update`` on every
server, sets the new weight version, which SGLang then reports with every sample, and flushes
the prefix cache (cached KV was computed by the old weights).
"""

from __future__ import annotations

import base64
import datetime
import io
import pickle
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator
from urllib.parse import urlsplit

import requests
import torch
import torch.distributed as dist

from megatron_sapo import torchvision_compat
from megatron_sapo.config import WEIGHT_SYNC_METHODS, WeightSyncMethod
from megatron_sapo.convert.export import export_hf, iter_hf_tensors
from megatron_sapo.convert.mapping import MappingTable
from megatron_sapo.parallel.collectives import comm_device
from megatron_sapo.parallel.ports import free_port

if TYPE_CHECKING:  # annotations only: Megatron is imported when a model is built
    from megatron.core.process_groups_config import ProcessGroupCollection

SyncPath = WeightSyncMethod
"""``rollout.weight_sync``: how the weights travel (config.py holds the one list)."""
SYNC_PATHS = WEIGHT_SYNC_METHODS


class WeightSyncError(RuntimeError):
    """A server refused or failed a weight update."""


@dataclass
class SyncStats:
    """What one sync moved, for logs and benchmarks."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0


@dataclass
class ServerEndpoint:
    url: str
    tp: int = 1
    """SGLang tensor-parallel size of that server (ranks it adds to an update group)."""


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` (a bigger tensor
    travels alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _post(url: str, path: str, body: dict | None, timeout: float) -> dict:
    response = requests.post(f"{url}{path}", json=body, timeout=timeout)
    try:
        payload = response.json()
    except ValueError:
        payload = {"message": response.text[:300]}
    if response.status_code != 200 or (isinstance(payload, dict) and payload.get("success") is False):
        raise WeightSyncError(f"{url}{path}: HTTP {response.status_code}: {payload.get('message', payload)}")
    return payload


def _serialize(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's wire format for ``update_weights_from_tensor`` (a pickle, base64 encoded).

    CUDA tensors are pickled by ForkingPickler as CUDA IPC handles: the server maps the
    trainer's memory, nothing is copied. CPU tensors are pickled by value: sharing them would
    need torch's shared-memory manager, a daemon that outlives the trainer's processes and keeps
    their inherited pipes open, or a connection back to the trainer that the server cannot
    authenticate."""
    buffer = io.BytesIO()
    if any(t.is_cuda for _, t in named):
        ForkingPickler(buffer).dump(named)
    else:
        pickle.dump(named, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class WeightSync:
    """Pushes the Megatron model's weights to SGLang servers. Every method is collective over
    the trainer's ranks (all must call it)."""

    model: torch.nn.Module
    table: MappingTable
    pg_collection: ProcessGroupCollection
    servers: list[ServerEndpoint]
    path: SyncPath = "tensor"
    bucket_bytes: int = 512 * 2**20
    dtype: torch.dtype | None = None
    """Cast tensors to this dtype before sending (the served dtype); None: as trained."""
    hf_config: dict | None = None
    """config.json of the served model (the disk path writes it)."""
    disk_dir: Path | None = None
    """Where the disk path writes its checkpoint (shared by trainer and servers)."""
    timeout_s: float = 600.0
    master_address: str | None = None
    """This rank's address in its update groups (distributed path); None: the one on its route
    to the first server (127.0.0.1 for a server on this machine)."""
    backend: str | None = None
    """Update-group backend of the distributed path; None: nccl with CUDA, else gloo."""
    _groups: dict = field(default_factory=dict, init=False, repr=False)
    _opened: int = field(default=0, init=False, repr=False)
    """Update groups this rank has opened so far (their names count them)."""
    _pushed: str | None = field(default=None, init=False, repr=False)
    """The weight version of the last sync."""

    def __post_init__(self) -> None:
        if self.path not in SYNC_PATHS:
            raise ValueError(f"weight sync path must be one of {', '.join(SYNC_PATHS)}, got {self.path!r}")
        if self.path == "disk" and (self.disk_dir is None or self.hf_config is None):
            raise ValueError("the disk weight-sync path needs disk_dir and hf_config")

    @property
    def _rank(self) -> int:
        return dist.get_rank()

    def sync(self, version: str) -> SyncStats:
        """Push the current weights and make the servers report ``version``."""
        start = time.perf_counter()
        if self.path == "distributed":
            self._drop_groups_of_restarted_servers()
        if self._rank == 0:
            for server in self.servers:
                _post(server.url, "/begin_weight_update", {}, self.timeout_s)
        dist.barrier()
        try:
            stats = {"tensor": self._push_tensor, "distributed": self._push_distributed,
                     "disk": self._push_disk}[self.path]()
        finally:
            dist.barrier()
            if self._rank == 0:
                for server in self.servers:
                    _post(server.url, "/end_weight_update", {}, self.timeout_s)
        if self._rank == 0:
            for server in self.servers:
                _post(server.url, "/update_weight_version", {"new_version": version, "abort_all_requests": False},
                      self.timeout_s)
                _post(server.url, "/flush_cache", None, self.timeout_s)
        dist.barrier()
        self._pushed = version
        totals = torch.tensor([stats.bytes, stats.tensors, stats.buckets], dtype=torch.float64, device=comm_device())
        dist.all_reduce(totals)
        return SyncStats(bytes=int(totals[0]), tensors=int(totals[1]), buckets=int(totals[2]),
                         seconds=time.perf_counter() - start)

    def close(self) -> None:
        """Tear down the update groups this rank opened (distributed path)."""
        for name, group in self._groups.items():
            for server in self.servers:
                _post(server.url, "/destroy_weights_update_group", {"group_name": name}, self.timeout_s)
            dist.destroy_process_group(group)
        self._groups.clear()

    def _drop_groups_of_restarted_servers(self) -> None:
        """Collective. A server reporting another version than the last sync's was restarted and
        is in none of the update groups any more: every rank drops its groups (the servers still
        up are asked to drop theirs too) and the push opens new ones."""
        restarted = [None]
        if self._rank == 0 and self._pushed is not None:
            restarted[0] = [s.url for s in self.servers if _weight_version(s.url, self.timeout_s) != self._pushed]
        dist.broadcast_object_list(restarted, src=0)
        if not restarted[0] or not self._groups:
            return
        for name, group in self._groups.items():
            for server in self.servers:
                if server.url not in restarted[0]:
                    _post(server.url, "/destroy_weights_update_group", {"group_name": name}, self.timeout_s)
            dist.destroy_process_group(group)
        self._groups.clear()

    # ---- the three paths ------------------------------------------------------------------------

    def _hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_hf_tensors(self.model, self.table, self.pg_collection):
            yield name, (tensor.to(self.dtype) if self.dtype is not None else tensor).contiguous()

    def _push_tensor(self) -> SyncStats:
        stats = SyncStats()
        for bucket in buckets(self._hf_tensors(), self.bucket_bytes):
            payload = _serialize(bucket)
            for server in self.servers:
                _post(server.url, "/update_weights_from_tensor",
                      {"serialized_named_tensors": [payload] * server.tp, "flush_cache": False}, self.timeout_s)
            _count(stats, bucket)
        return stats

    def _push_distributed(self) -> SyncStats:
        stats = SyncStats()
        # Every rank that owns tensors sends them through its own group.
        for bucket in buckets(self._hf_tensors(), self.bucket_bytes):
            if not self._groups:
                self._opened += 1
                self._open_group(f"megatron-sapo-sync-{self._rank}-{self._opened}")
            (name, group), = self._groups.items()
            self._broadcast_bucket(group, name, bucket)
            _count(stats, bucket)
        return stats

    def _push_disk(self) -> SyncStats:
        out = export_hf(self.model, self.table, self.pg_collection, self.disk_dir, self.hf_config,
                        dtype=self.dtype, force=True)
        stats = SyncStats()
        if self._rank == 0:
            for server in self.servers:
                _post(server.url, "/update_weights_from_disk", {"model_path": str(out), "flush_cache": False},
                      self.timeout_s)
            files = list(Path(out).glob("*.safetensors"))
            stats.bytes, stats.buckets = sum(f.stat().st_size for f in files), len(files)
        return stats

    # ---- distributed-path helpers ---------------------------------------------------------------

    def _open_group(self, name: str):
        """Create the update group between this rank (rank 0 in it) and every server's ranks."""
        address = self.master_address or route_address(self.servers[0].url)
        port = free_port(host=address)
        world = 1 + sum(s.tp for s in self.servers)
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        replies: list = []

        def ask_servers():
            offset = 1
            for server in self.servers:
                replies.append(_post(server.url, "/init_weights_update_group", {
                    "master_address": address, "master_port": port, "rank_offset": offset,
                    "world_size": world, "group_name": name, "backend": backend}, self.timeout_s))
                offset += server.tp

        torchvision_compat.ensure_importable()  # sglang imports torchvision
        from sglang.srt.utils.common import init_custom_process_group

        asking = threading.Thread(target=ask_servers, daemon=True)
        asking.start()
        group = init_custom_process_group(
            backend=backend, init_method=f"tcp://{address}:{port}", world_size=world, rank=0,
            group_name=name, timeout=datetime.timedelta(seconds=self.timeout_s))
        asking.join(self.timeout_s)
        if asking.is_alive() or len(replies) != len(self.servers):
            raise WeightSyncError(f"servers did not join weight-update group {name} (port {port})")
        self._groups[name] = group

    def _broadcast_bucket(self, group, name: str, bucket: list[tuple[str, torch.Tensor]]) -> None:
        body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": name, "flush_cache": False}
        errors: list[Exception] = []

        def request(server):
            try:
                _post(server.url, "/update_weights_from_distributed", body, self.timeout_s)
            except Exception as err:  # reported after the broadcast, which the servers wait for
                errors.append(err)

        threads = [threading.Thread(target=request, args=(s,), daemon=True) for s in self.servers]
        for thread in threads:
            thread.start()
        device = comm_device(group)
        for _, tensor in bucket:
            dist.broadcast(tensor.to(device), group_src=0, group=group)
        for thread in threads:
            thread.join(self.timeout_s)
        if errors:
            raise WeightSyncError(str(errors[0]))


def route_address(url: str) -> str:
    """This machine's address on its route to ``url``'s host: the one a server there reaches it at."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((parts.hostname, parts.port or 80))  # a UDP connect only picks the route
        return sock.getsockname()[0]


def _weight_version(url: str, timeout_s: float) -> str | None:
    response = requests.get(f"{url}/model_info", timeout=timeout_s)
    response.raise_for_status()
    return response.json().get("weight_version")


def _count(stats: SyncStats, bucket: list[tuple[str, torch.Tensor]]) -> None:
    stats.buckets += 1
    stats.tensors += len(bucket)
    stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
