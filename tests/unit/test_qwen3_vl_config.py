"""Qwen3-VL-MoE: HF config -> Megatron configs, multimodal RoPE positions, vision resampling.

Positions and resampling are checked against transformers' own functions, on grids that are
not square and images of several sizes.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_sapo import torchvision_compat
from megatron_sapo.config import ConfigError, ParallelConfig
from megatron_sapo.models import qwen3_vl
from megatron_sapo.models.tiny_vl import TINY_QWEN3_VL_MOE

pytestmark = pytest.mark.unit

QWEN3_VL_30B_A3B = json.loads((Path(__file__).parents[2] / "examples" / "qwen3_vl_30b_a3b" / "hf_config.json")
                              .read_text())
"""Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (the fields the derivation reads), as shipped."""


def test_qwen3_vl_30b_a3b_fields():
    spec = qwen3_vl.from_hf_config(QWEN3_VL_30B_A3B, ParallelConfig(tp=4, ep=8))
    text, vision = spec.config, spec.vision.config
    assert (text.num_layers, text.hidden_size, text.num_query_groups, text.kv_channels) == (48, 2048, 4, 128)
    assert (text.num_moe_experts, text.moe_router_topk, text.moe_ffn_hidden_size) == (128, 8, 768)
    assert text.moe_router_pre_softmax is False  # the VL router always renormalises its top-k
    assert text.mrope_section == [24, 20, 20] and spec.mrope_interleaved and spec.text.rotary_base == 5e6
    assert (vision.num_layers, vision.hidden_size, vision.num_attention_heads, vision.ffn_hidden_size) == \
        (27, 1152, 16, 4304)
    assert vision.normalization == "LayerNorm" and vision.add_bias_linear and not vision.gated_linear_unit
    assert vision.tensor_model_parallel_size == 4 and not vision.sequence_parallel
    assert spec.vision.patch_dim == 3 * 2 * 16 * 16 and spec.vision.deepstack_visual_indexes == (8, 16, 24)
    assert spec.fused_experts and spec.padded_vocab_size == 152064 and spec.image_token_id == 151655


@pytest.mark.parametrize("change, message", [
    (dict(text_config={"rope_parameters": {"rope_type": "default", "mrope_section": [4, 3, 2]}}), "mrope_section"),
    (dict(vision_config={"num_heads": 3}), "num_heads=3 is not divisible by parallel.tp=2"),
    (dict(vision_config={"out_hidden_size": 40}), "out_hidden_size=40"),
    (dict(vision_config={"hidden_act": "quick_gelu"}), "hidden_act"),
    (dict(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"]), "unsupported architecture"),
])
def test_bad_configs_are_refused_by_field(change, message):
    hf = {**TINY_QWEN3_VL_MOE, **{k: v for k, v in change.items() if not k.endswith("_config")}}
    for key in ("text_config", "vision_config"):
        hf[key] = {**TINY_QWEN3_VL_MOE[key], **change.get(key, {})}
    with pytest.raises(ConfigError, match=message):
        qwen3_vl.from_hf_config(hf, ParallelConfig(tp=2))


def test_deepstack_layers_must_sit_on_the_first_stage():
    qwen3_vl.from_hf_config(TINY_QWEN3_VL_MOE, ParallelConfig(pp=2))  # 3 of 6 layers on stage 0: fine
    with pytest.raises(ConfigError, match="3 deepstack layers must sit on the first pipeline stage"):
        qwen3_vl.from_hf_config(TINY_QWEN3_VL_MOE, ParallelConfig(pp=3))


@pytest.mark.parametrize("recompute, text, vision", [
    ("none", None, None), ("selective", "selective", "selective"), ("full", "full", "selective"),
])
def test_recompute_reaches_the_text_model_and_the_tower(recompute, text, vision):
    """The tower calls its blocks itself, so it recomputes their attention under either mode."""
    spec = qwen3_vl.from_hf_config(TINY_QWEN3_VL_MOE, ParallelConfig(recompute=recompute))
    assert (spec.config.recompute_granularity, spec.vision.config.recompute_granularity) == (text, vision)


@pytest.fixture(scope="module")
def hf_vl_model():
    torchvision_compat.ensure_importable()
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    fields = {k: v for k, v in TINY_QWEN3_VL_MOE.items() if k not in ("architectures", "model_type")}
    return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**fields)).eval()


IMAGE = TINY_QWEN3_VL_MOE["image_token_id"]


def placeholders(t, h, w):
    return [IMAGE] * (t * h * w // 4)


@pytest.mark.parametrize("rows, grids", [
    ([[5, 6, 101, *placeholders(1, 4, 6), 102, 7, 8]], [[1, 4, 6]]),
    ([[101, *placeholders(1, 8, 4), 102, 3, 101, *placeholders(1, 2, 2), 102, 9]], [[1, 8, 4], [1, 2, 2]]),
    ([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], []),
])
def test_mrope_positions_equal_transformers(hf_vl_model, rows, grids):
    ids = torch.tensor(rows)
    grid = torch.tensor(grids) if grids else None
    ours = qwen3_vl.mrope_position_ids(ids, grid, image_token_id=IMAGE, spatial_merge_size=2)
    token_types = (ids == IMAGE).int()
    theirs, _ = hf_vl_model.model.get_rope_index(ids, token_types, grid)
    assert torch.equal(ours, theirs)


def test_mrope_positions_run_through_rows_in_order():
    a = [7, *placeholders(1, 2, 4), 8]
    b = [9, *placeholders(1, 4, 2), 3]
    both = qwen3_vl.mrope_position_ids(torch.tensor([a, b]), torch.tensor([[1, 2, 4], [1, 4, 2]]),
                                       image_token_id=IMAGE, spatial_merge_size=2)
    second = qwen3_vl.mrope_position_ids(torch.tensor([b]), torch.tensor([[1, 4, 2]]), image_token_id=IMAGE,
                                         spatial_merge_size=2)
    assert torch.equal(both[:, 1:], second)


def test_mrope_positions_refuse_mismatched_images():
    with pytest.raises(ValueError, match="no image left"):
        qwen3_vl.mrope_position_ids(torch.tensor([[1, IMAGE, IMAGE]]), None, image_token_id=IMAGE,
                                    spatial_merge_size=2)
    with pytest.raises(ValueError, match="fewer follow"):
        qwen3_vl.mrope_position_ids(torch.tensor([[1, *placeholders(1, 2, 4)[:-1], 5]]), torch.tensor([[1, 2, 4]]),
                                    image_token_id=IMAGE, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more images"):
        qwen3_vl.mrope_position_ids(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 2]]), image_token_id=IMAGE,
                                    spatial_merge_size=2)


def test_interleaved_axes_match_transformers_recomposition(hf_vl_model):
    rotary = hf_vl_model.model.language_model.rotary_emb
    section = tuple(TINY_QWEN3_VL_MOE["text_config"]["rope_parameters"]["mrope_section"])
    freqs = torch.stack([torch.full((1, 1, 10), float(axis)) for axis in range(3)])  # value = axis index
    expected = rotary.recomposition_frequencies(freqs.clone())[0, 0, :10].long()
    assert torch.equal(qwen3_vl._mrope_axis_of_frequency(section, 10), expected)


@pytest.mark.parametrize("grids", [[[1, 4, 6]], [[1, 8, 4], [2, 2, 2]], [[1, 2, 10]]])
def test_position_table_resampling_and_rotary_positions_equal_transformers(hf_vl_model, grids):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    grid = torch.tensor(grids)
    table = torch.randn(16, 5)
    index, weight = qwen3_vl.vision_position_embedding_taps(grid, side=4, merge=2)
    ref_index, ref_weight = get_vision_interpolation_indices_and_weights(grid, 4, mode="bilinear", align_corners=True,
                                                                         spatial_merge_size=2)
    ours = (table[index] * weight[..., None]).sum(1)
    theirs = (table[ref_index] * ref_weight[..., None]).sum(1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(qwen3_vl.vision_rotary_positions(grid, merge=2), get_vision_position_ids(grid, 2))


def test_attention_stays_within_each_frame():
    mask = qwen3_vl._block_diagonal_mask(torch.tensor([[1, 2, 2], [2, 1, 2]]), "cpu")[0, 0]
    allowed = ~mask
    assert allowed.shape == (8, 8)
    assert allowed[:4, :4].all() and allowed[4:6, 4:6].all() and allowed[6:, 6:].all()
    assert int(allowed.sum()) == 16 + 4 + 4


def _mrope_per_token(ids: list[int], grids: list[list[int]], merge: int = 2) -> torch.Tensor:
    """The positions one token at a time, as the model code computed them before it used
    tensor operations: the reference for long rows and adjacent images."""
    out, start, i, grids = torch.empty(3, len(ids), dtype=torch.long), 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != IMAGE:
            out[:, i], start, i = start, start + 1, i + 1
            continue
        t, h, w = next(grids)
        gh, gw = h // merge, w // merge
        frame, r, c = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + t * gh * gw] = start + torch.stack([frame, r, c]).reshape(3, -1)
        start, i = start + max(gh, gw), i + t * gh * gw
    return out


def test_mrope_positions_of_long_rows_and_adjacent_images_match_the_per_token_reference():
    g = torch.Generator().manual_seed(0)
    rows, all_grids = [], []
    for _ in range(3):
        row, grids = [], []
        for _ in range(6):
            text = torch.randint(0, 1000, (int(torch.randint(0, 3000, (1,), generator=g)),), generator=g)
            row += [token for token in text.tolist() if token != IMAGE]
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):  # one image, or two back to back
                grid = [int(torch.randint(1, 3, (1,), generator=g)), 2 * int(torch.randint(1, 6, (1,), generator=g)),
                        2 * int(torch.randint(1, 6, (1,), generator=g))]
                row += placeholders(*grid)
                grids.append(grid)
        rows.append(row)
        all_grids.append(grids)
    width = max(map(len, rows))
    padded = [row + [0] * (width - len(row)) for row in rows]
    ours = qwen3_vl.mrope_position_ids(torch.tensor(padded), torch.tensor([g for gs in all_grids for g in gs]),
                                       image_token_id=IMAGE, spatial_merge_size=2)
    for b, (row, grids) in enumerate(zip(padded, all_grids)):
        assert torch.equal(ours[:, b], _mrope_per_token(row, grids))


def test_vision_language_classes_are_built_once():
    assert qwen3_vl._vl_model_class() is qwen3_vl._vl_model_class()
    assert qwen3_vl._vision_tower_class() is qwen3_vl._vision_tower_class()
    assert qwen3_vl._interleaved_mrope_class() is qwen3_vl._interleaved_mrope_class()
