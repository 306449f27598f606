"""How a Hub checkpoint stores the tensors a weight table names: the fused-expert storage adapter.

Weight tables name HF tensors *logically*, experts one by one:
``{layer}.mlp.experts.{e}.gate_proj.weight`` ``[I, H]``, ``up_proj`` ``[I, H]``,
``down_proj`` ``[H, I]`` (the Qwen3-MoE Hub names). Qwen3-VL-MoE's Hub checkpoints store a
layer's experts fused instead, in the *Hub orientation*:

* ``{layer}.mlp.experts.gate_up_proj`` ``[E, H, 2I]``: expert ``e``'s gate is
  ``[e, :, :I]`` and its up projection ``[e, :, I:]``, both transposed;
* ``{layer}.mlp.experts.down_proj`` ``[E, I, H]``: expert ``e``'s down projection, transposed.

Some transformers versions save the in-memory orientation, ``[E, 2I, H]`` / ``[E, H, I]``.
Reading accepts both, telling them apart by shape with the config's sizes (where ``H == 2I``
makes ``gate_up_proj`` ambiguous, ``down_proj`` is not, and the other way round: both
tensors of a layer come from one writer). Writing always produces the Hub orientation.

Memory: a reader keeps the fused tensors of one layer (read once, not once per expert); a
writer fills one layer's fused tensors and hands each over as soon as all experts are in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import torch

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.errors import InputError

Kind = Literal["gate_up_proj", "down_proj"]
GATE_UP: Kind = "gate_up_proj"
DOWN: Kind = "down_proj"
_LOGICAL = re.compile(r"(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"(?P<layer>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)")
_KIND_OF = {"gate_proj": GATE_UP, "up_proj": GATE_UP, "down_proj": DOWN}


@dataclass(frozen=True)
class ExpertName:
    """A logical expert tensor name, taken apart."""

    layer: str
    """The name up to ``.experts`` (``model.language_model.layers.3.mlp.experts``)."""
    expert: int
    proj: str
    """``gate_proj``, ``up_proj`` or ``down_proj``."""

    @classmethod
    def parse(cls, name: str) -> "ExpertName | None":
        m = _LOGICAL.fullmatch(name)
        return None if m is None else cls(m["layer"], int(m["expert"]), m["proj"])

    @property
    def kind(self) -> Kind:
        return _KIND_OF[self.proj]

    @property
    def stored(self) -> str:
        """The fused tensor holding this one."""
        return f"{self.layer}.{self.kind}"


@dataclass(frozen=True)
class FusedExperts:
    """The sizes the fused tensors have: experts per layer, hidden size, expert width."""

    num_experts: int
    hidden_size: int
    width: int
    """``moe_intermediate_size``."""

    @classmethod
    def of(cls, spec) -> "FusedExperts | None":
        """The fused storage of a model spec whose family stores experts fused, else None."""
        if not getattr(spec, "fused_experts", False):
            return None
        cfg = spec.config
        return cls(cfg.num_moe_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size)

    def hub_shape(self, kind: Kind) -> tuple[int, int, int]:
        e, h, i = self.num_experts, self.hidden_size, self.width
        return (e, h, 2 * i) if kind == GATE_UP else (e, i, h)

    def transposed_shape(self, kind: Kind) -> tuple[int, int, int]:
        """The shape transformers' in-memory orientation has (``[E, 2I, H]`` / ``[E, H, I]``)."""
        e, a, b = self.hub_shape(kind)
        return e, b, a

    def logical_shape(self, proj: str) -> tuple[int, int]:
        return (self.hidden_size, self.width) if proj == "down_proj" else (self.width, self.hidden_size)


# ---- reading -------------------------------------------------------------------------------------


class LogicalCheckpoint:
    """An :class:`HFCheckpoint` whose fused experts are read under their logical names.

    Tensors stored under their logical names (and all other tensors) are read as they are.
    """

    def __init__(self, checkpoint: HFCheckpoint, fused: FusedExperts):
        self.checkpoint, self.fused = checkpoint, fused
        self.dir = checkpoint.dir
        self._layer: str | None = None
        self._cached: dict[Kind, tuple[torch.Tensor, bool]] = {}
        """The current layer's fused tensors as read, each with whether it is in Hub orientation."""

    def names(self) -> list[str]:
        names = []
        for name in self.checkpoint.names():
            m = _FUSED.fullmatch(name)
            if m is None:
                names.append(name)
                continue
            projs = ("gate_proj", "up_proj") if m["kind"] == GATE_UP else ("down_proj",)
            names += [f"{m['layer']}.{e}.{proj}.weight" for e in range(self.fused.num_experts) for proj in projs]
        return names

    def get(self, name: str) -> torch.Tensor:
        parsed = ExpertName.parse(name)
        if parsed is None or name in self.checkpoint:
            return self.checkpoint.get(name)
        if parsed.stored not in self.checkpoint:
            raise InputError(f"{self.dir}: neither {name!r} nor the fused {parsed.stored!r} is in the checkpoint")
        if not 0 <= parsed.expert < self.fused.num_experts:
            raise KeyError(f"{self.dir}: {name!r} names expert {parsed.expert}; {parsed.stored} holds "
                           f"{self.fused.num_experts} (config.json)")
        tensor, hub = self._fused(parsed)
        i = self.fused.width
        if parsed.proj == "gate_proj":
            part = tensor[parsed.expert, :, :i].T if hub else tensor[parsed.expert, :i]
        elif parsed.proj == "up_proj":
            part = tensor[parsed.expert, :, i:].T if hub else tensor[parsed.expert, i:]
        else:
            part = tensor[parsed.expert].T if hub else tensor[parsed.expert]
        # A copy: a caller keeping one expert must not pin the whole layer.
        return part.clone(memory_format=torch.contiguous_format)

    def _fused(self, parsed: ExpertName) -> tuple[torch.Tensor, bool]:
        if parsed.layer != self._layer:
            self._layer, self._cached = parsed.layer, {}
        if parsed.kind not in self._cached:
            hub = self.is_hub_orientation(parsed.layer, parsed.kind)
            self._cached[parsed.kind] = (self.checkpoint.get(parsed.stored), hub)
        return self._cached[parsed.kind]

    def is_hub_orientation(self, layer: str, kind: Kind) -> bool:
        """Whether ``{layer}.{kind}`` is stored in the Hub orientation (else transformers'), from
        the shapes in the file headers; a tensor whose shape fits both takes its partner's."""
        own = self._orientation(layer, kind)
        if own is not None:
            return own
        partner = DOWN if kind == GATE_UP else GATE_UP
        other = self._orientation(layer, partner) if f"{layer}.{partner}" in self.checkpoint else None
        return True if other is None else other

    def _orientation(self, layer: str, kind: Kind) -> bool | None:
        """True: Hub orientation; False: transformers'; None: the shape fits both."""
        name = f"{layer}.{kind}"
        shape = self.checkpoint.shape(name)
        hub, transposed = self.fused.hub_shape(kind), self.fused.transposed_shape(kind)
        if shape == hub and shape == transposed:
            return None
        if shape in (hub, transposed):
            return shape == hub
        raise InputError(f"{self.dir}: {name} has shape {shape}; config.json implies {hub} (Hub orientation) or "
                         f"{transposed} (transformers' orientation) for {self.fused.num_experts} experts, "
                         f"hidden_size={self.fused.hidden_size}, moe_intermediate_size={self.fused.width}")


def logical_view(checkpoint: HFCheckpoint, fused: FusedExperts | None):
    """``checkpoint`` read under the table's logical names (itself when experts are not fused)."""
    return checkpoint if fused is None else LogicalCheckpoint(checkpoint, fused)


# ---- writing -------------------------------------------------------------------------------------


class ExpertFuser:
    """Collects logical expert tensors and returns each layer's fused Hub tensor once all its
    experts are in; every other tensor passes straight through."""

    def __init__(self, fused: FusedExperts):
        self.fused = fused
        self._pending: dict[str, tuple[torch.Tensor, set[tuple[int, str]]]] = {}
        """Fused name -> (its Hub-orientation buffer, the (expert, proj) slots filled so far)."""

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        parsed = ExpertName.parse(name)
        if parsed is None:
            return [(name, tensor)]
        expected = self.fused.logical_shape(parsed.proj)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; config.json implies {expected}")
        if not 0 <= parsed.expert < self.fused.num_experts:
            raise ValueError(f"{name}: expert {parsed.expert} is outside the {self.fused.num_experts} of config.json")
        buffer, filled = self._pending.get(parsed.stored) or self._start(parsed.stored, parsed.kind, tensor)
        if (parsed.expert, parsed.proj) in filled:
            raise ValueError(f"{name} was given twice")
        if buffer.dtype != tensor.dtype:
            raise ValueError(f"{name} is {tensor.dtype}; other experts of {parsed.stored} are {buffer.dtype}")
        i = self.fused.width
        target = {"gate_proj": buffer[parsed.expert, :, :i], "up_proj": buffer[parsed.expert, :, i:],
                  "down_proj": buffer[parsed.expert]}[parsed.proj]
        target.copy_(tensor.T)
        filled.add((parsed.expert, parsed.proj))
        if len(filled) < self.fused.num_experts * (2 if parsed.kind == GATE_UP else 1):
            return []
        del self._pending[parsed.stored]
        return [(parsed.stored, buffer)]

    def _start(self, stored: str, kind: Kind, like: torch.Tensor):
        entry = (like.new_empty(self.fused.hub_shape(kind)), set())
        self._pending[stored] = entry
        return entry

    def check_complete(self) -> None:
        """Raise if a layer still misses experts (nothing may be left unwritten)."""
        if self._pending:
            missing = {name: self.fused.num_experts * (2 if name.endswith(GATE_UP) else 1) - len(filled)
                       for name, (_, filled) in self._pending.items()}
            raise ValueError("fused expert tensors left incomplete (name: missing expert tensors): "
                             + ", ".join(f"{n}: {k}" for n, k in sorted(missing.items())))


def fuse_experts(named: Iterable[tuple[str, torch.Tensor]], fused: FusedExperts | None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """``named`` (logical names) in the Hub storage layout: unchanged when experts are not fused."""
    if fused is None:
        yield from named
        return
    fuser = ExpertFuser(fused)
    for name, tensor in named:
        yield from fuser.add(name, tensor)
    fuser.check_complete()


# ---- after transformers' save_pretrained -------------------------------------------------------


def write_hub_expert_orientation(model: torch.nn.Module, out: Path) -> None:
    """Rewrite the saved fused experts as ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``.

    The tensors come from the in-memory model, whose orientation (``[E, 2I, H]`` / ``[E, H, I]``)
    is checked, so the result does not depend on which orientation ``save_pretrained`` chose.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = model.config.text_config
    experts, hidden, width = text.num_experts, text.hidden_size, text.moe_intermediate_size
    in_memory = {"gate_up_proj": (experts, 2 * width, hidden), "down_proj": (experts, hidden, width)}
    params = dict(model.named_parameters())
    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out}: save_pretrained wrote no .safetensors file")
    rewritten = 0
    for path in files:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for key in tensors:
            kind = key.rsplit(".", 1)[-1]
            if ".mlp.experts." not in key or kind not in in_memory:
                continue
            param = params[key]
            if tuple(param.shape) != in_memory[kind]:
                raise ValueError(f"{key}: in-memory shape {tuple(param.shape)}, expected {in_memory[kind]} "
                                 "(transformers changed its fused-expert layout?)")
            tensors[key] = param.detach().transpose(1, 2).contiguous()
            rewritten += 1
        save_file(tensors, path, metadata=metadata or {"format": "pt"})
    expected = sum(1 for key in params if ".mlp.experts." in key and key.rsplit(".", 1)[-1] in in_memory)
    if rewritten != expected:
        raise ValueError(f"{out}: rewrote {rewritten} fused expert tensors, the model has {expected}")


__all__ = ["DOWN", "GATE_UP", "ExpertFuser", "ExpertName", "FusedExperts", "LogicalCheckpoint", "fuse_experts",
           "logical_view", "write_hub_expert_orientation"]
