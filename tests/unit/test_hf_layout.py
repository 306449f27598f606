"""The fused-expert storage adapter against real safetensors files on disk.

Sizes: 3 experts, hidden 10, expert width 6 (H != 2I != I), so every orientation is told apart
by shape; the ambiguous cases use H == 2I and H == I on purpose.
"""

import pytest
import torch
from safetensors.torch import save_file

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.hf_layout import ExpertFuser, ExpertName, FusedExperts, LogicalCheckpoint, fuse_experts
from megatron_sapo.errors import InputError

pytestmark = pytest.mark.unit

LAYER = "model.language_model.layers.{}.mlp.experts"
SIZES = FusedExperts(num_experts=3, hidden_size=10, width=6)


def per_expert(sizes: FusedExperts, layers=(0,), seed=0) -> dict[str, torch.Tensor]:
    """Random logical tensors: gate/up ``[I, H]``, down ``[H, I]`` per expert and layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        for e in range(sizes.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{LAYER.format(layer)}.{e}.{proj}.weight"] = torch.randn(sizes.logical_shape(proj), generator=g)
    return out


def hub_fused(logical: dict[str, torch.Tensor], sizes: FusedExperts, layer: int) -> dict[str, torch.Tensor]:
    """The Hub tensors written out by hand from the definition: gate_up ``[E, H, 2I]`` (gate first
    on the last axis, transposed), down ``[E, I, H]`` (transposed)."""
    prefix = LAYER.format(layer)
    gate_up = torch.stack([torch.cat([logical[f"{prefix}.{e}.gate_proj.weight"],
                                      logical[f"{prefix}.{e}.up_proj.weight"]]).T for e in range(sizes.num_experts)])
    down = torch.stack([logical[f"{prefix}.{e}.down_proj.weight"].T for e in range(sizes.num_experts)])
    return {f"{prefix}.gate_up_proj": gate_up.contiguous(), f"{prefix}.down_proj": down.contiguous()}


def write(tmp_path, tensors: dict[str, torch.Tensor]) -> HFCheckpoint:
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return HFCheckpoint(tmp_path)


def transposed(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory orientation: ``[E, 2I, H]`` / ``[E, H, I]``."""
    return {name: t.transpose(1, 2).contiguous() for name, t in fused.items()}


@pytest.mark.parametrize("orientation", ["hub", "transformers"])
def test_reads_logical_experts_from_either_orientation(tmp_path, orientation):
    logical = per_expert(SIZES, layers=(0, 1))
    fused = {**hub_fused(logical, SIZES, 0), **hub_fused(logical, SIZES, 1)}
    stored = fused if orientation == "hub" else transposed(fused)
    norm = torch.randn(10)
    view = LogicalCheckpoint(write(tmp_path, {**stored, "model.language_model.norm.weight": norm}), SIZES)
    assert sorted(view.names()) == sorted([*logical, "model.language_model.norm.weight"])
    for name, expected in logical.items():
        got = view.get(name)
        assert got.is_contiguous() and torch.equal(got, expected), name
    assert torch.equal(view.get("model.language_model.norm.weight"), norm)


@pytest.mark.parametrize("orientation", ["hub", "transformers"])
@pytest.mark.parametrize("sizes", [FusedExperts(3, 12, 6), FusedExperts(3, 6, 6)], ids=["H=2I", "H=I"])
def test_an_ambiguous_tensor_takes_its_partners_orientation(tmp_path, orientation, sizes):
    """H == 2I: gate_up_proj fits both orientations, down_proj does not (and the other way for H == I)."""
    logical = per_expert(sizes)
    fused = hub_fused(logical, sizes, 0)
    stored = fused if orientation == "hub" else transposed(fused)
    view = LogicalCheckpoint(write(tmp_path, stored), sizes)
    assert all(torch.equal(view.get(name), expected) for name, expected in logical.items())


def test_a_layer_is_read_once_not_once_per_expert(tmp_path, monkeypatch):
    logical = per_expert(SIZES, layers=(0, 1))
    checkpoint = write(tmp_path, {**hub_fused(logical, SIZES, 0), **hub_fused(logical, SIZES, 1)})
    reads = []
    original = HFCheckpoint.get
    monkeypatch.setattr(HFCheckpoint, "get", lambda self, name: reads.append(name) or original(self, name))
    view = LogicalCheckpoint(checkpoint, SIZES)
    for layer in (0, 1):  # the loader's order: per expert, gate and up (linear_fc1) then down (linear_fc2)
        for e in range(SIZES.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                view.get(f"{LAYER.format(layer)}.{e}.{proj}.weight")
    assert reads == [f"{LAYER.format(layer)}.{kind}" for layer in (0, 1) for kind in ("gate_up_proj", "down_proj")]


def test_tensors_stored_per_expert_are_read_as_they_are(tmp_path):
    logical = per_expert(SIZES)
    view = LogicalCheckpoint(write(tmp_path, logical), SIZES)
    assert sorted(view.names()) == sorted(logical)
    assert all(torch.equal(view.get(n), t) for n, t in logical.items())


def test_reading_errors_name_the_tensor(tmp_path):
    logical = per_expert(SIZES)
    fused = hub_fused(logical, SIZES, 0)
    fused[f"{LAYER.format(0)}.down_proj"] = torch.zeros(3, 6, 11)  # neither [3, 6, 10] nor [3, 10, 6]
    view = LogicalCheckpoint(write(tmp_path, fused), SIZES)
    with pytest.raises(InputError, match=r"layers\.0\.mlp\.experts\.down_proj has shape \(3, 6, 11\); config\.json "
                                         r"implies \(3, 6, 10\) \(Hub orientation\) or \(3, 10, 6\)"):
        view.get(f"{LAYER.format(0)}.1.down_proj.weight")
    with pytest.raises(InputError, match=r"neither .*layers\.5\.mlp\.experts\.0\.gate_proj\.weight.* nor the fused "
                                         r".*layers\.5\.mlp\.experts\.gate_up_proj"):
        view.get(f"{LAYER.format(5)}.0.gate_proj.weight")
    with pytest.raises(KeyError, match="names expert 3; .* holds 3"):
        view.get(f"{LAYER.format(0)}.3.gate_proj.weight")


def test_writer_fuses_each_layer_in_hub_orientation_once_all_experts_are_in(tmp_path):
    logical = per_expert(SIZES, layers=(0, 1))
    fuser = ExpertFuser(SIZES)
    norm = torch.randn(10)
    assert fuser.add("model.language_model.norm.weight", norm) == [("model.language_model.norm.weight", norm)]
    written = {}
    for name, tensor in logical.items():
        out = fuser.add(name, tensor)
        parsed = ExpertName.parse(name)
        last_gate_up = parsed.proj == "up_proj" and parsed.expert == SIZES.num_experts - 1
        last_down = parsed.proj == "down_proj" and parsed.expert == SIZES.num_experts - 1
        assert [n for n, _ in out] == ([parsed.stored] if last_gate_up or last_down else []), name
        written.update(out)
    fuser.check_complete()
    expected = {**hub_fused(logical, SIZES, 0), **hub_fused(logical, SIZES, 1)}
    assert sorted(written) == sorted(expected)
    # Through a real file and back through the reader: the logical tensors, bit for bit.
    view = LogicalCheckpoint(write(tmp_path, written), SIZES)
    for name in expected:
        assert view.checkpoint.shape(name) == tuple(expected[name].shape)
        assert torch.equal(view.checkpoint.get(name), expected[name])
    assert all(torch.equal(view.get(n), t) for n, t in logical.items())


def test_writer_refuses_incomplete_duplicate_and_misshapen_experts():
    logical = per_expert(SIZES)
    fuser = ExpertFuser(SIZES)
    first = next(iter(logical))
    fuser.add(first, logical[first])
    with pytest.raises(ValueError, match="given twice"):
        fuser.add(first, logical[first])
    with pytest.raises(ValueError, match=r"experts\.1\.down_proj\.weight has shape \(6, 10\); config\.json implies "
                                         r"\(10, 6\)"):
        fuser.add(f"{LAYER.format(0)}.1.down_proj.weight", torch.zeros(6, 10))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.gate_up_proj: 5"):
        fuser.check_complete()
    with pytest.raises(ValueError, match="left incomplete"):
        list(fuse_experts(list(logical.items())[:-1], SIZES))


def test_unfused_models_pass_through_unchanged():
    logical = list(per_expert(SIZES).items())
    assert list(fuse_experts(logical, None)) == logical
