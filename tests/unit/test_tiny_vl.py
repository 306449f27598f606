"""The tiny Qwen3-VL-MoE checkpoint: Hub layout on disk, faithful reload, processor, token ids,
and which variants SGLang may serve."""

import json

import pytest
import torch
from safetensors import safe_open

from megatron_sapo.data.tiny_tokenizer import (EOS_ID, IMAGE_PAD_ID, PAD_ID, VIDEO_PAD_ID, VISION_END_ID,
                                               VISION_START_ID, VOCAB)
from megatron_sapo.models.tiny_vl import (TINY_QWEN3_VL_MOE, build_tiny_qwen3_vl_moe, png_bytes,
                                          save_tiny_qwen3_vl_moe, synthetic_image)
from megatron_sapo.rollout.server import UnservableModel, check_servable

pytestmark = pytest.mark.unit

SEED = 7
TEXT = TINY_QWEN3_VL_MOE["text_config"]
E, H, I = TEXT["num_experts"], TEXT["hidden_size"], TEXT["moe_intermediate_size"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_qwen3_vl_moe(tmp_path_factory.mktemp("tiny_vl") / "model", seed=SEED)


@pytest.fixture(scope="module")
def in_memory():
    return build_tiny_qwen3_vl_moe(seed=SEED)


@pytest.fixture(scope="module")
def processor(saved):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(saved)


def read_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_sizes_are_awkward_and_sglang_compatible():
    assert len({H, 2 * I, I}) == 3
    assert TEXT["head_dim"] * TEXT["num_attention_heads"] != H
    assert TEXT["vocab_size"] % 2 == 1
    assert sum(TEXT["rope_parameters"]["mrope_section"]) == TEXT["head_dim"] // 2
    assert TEXT["num_hidden_layers"] >= 3 and len(TINY_QWEN3_VL_MOE["vision_config"]["deepstack_visual_indexes"]) == 3
    assert TINY_QWEN3_VL_MOE["vision_config"]["out_hidden_size"] == H


def test_fused_experts_are_saved_in_the_hub_orientation(saved, in_memory):
    tensors = read_tensors(saved)
    fused = sorted(k for k in tensors if ".mlp.experts." in k)
    assert len(fused) == 2 * TEXT["num_hidden_layers"]
    assert not any(".experts.0." in k for k in tensors)  # fused, not per expert
    for layer, block in enumerate(in_memory.model.language_model.layers):
        prefix = f"model.language_model.layers.{layer}.mlp.experts."
        gate_up, down = tensors[prefix + "gate_up_proj"], tensors[prefix + "down_proj"]
        assert gate_up.shape == (E, H, 2 * I) and down.shape == (E, I, H)
        # transformers' in-memory layout is [E, 2I, H] (gate rows first) and [E, H, I].
        memory_gate_up, memory_down = block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj
        assert torch.equal(gate_up[:, :, :I], memory_gate_up[:, :I, :].transpose(1, 2))
        assert torch.equal(gate_up[:, :, I:], memory_gate_up[:, I:, :].transpose(1, 2))
        assert torch.equal(down, memory_down.transpose(1, 2))


def test_norms_and_biases_are_random(saved):
    tensors = read_tensors(saved)
    norms = [v for k, v in tensors.items() if k.endswith("norm.weight")]
    biases = [v for k, v in tensors.items() if k.endswith(".bias")]
    assert norms and biases
    assert all(0.5 <= float(v.min()) and float(v.max()) <= 1.5 and v.std() > 0.1 for v in norms if v.numel() > 4)
    assert all(v.abs().max() > 0.1 for v in biases)


def test_reload_gives_the_in_memory_logits_on_an_image_prompt(saved, in_memory, processor):
    from transformers import Qwen3VLMoeForConditionalGeneration

    loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[synthetic_image(1)], return_tensors="pt")
    with torch.no_grad():
        ours, theirs = loaded(**inputs).logits, in_memory(**inputs).logits
    assert ours.shape == (1, inputs["input_ids"].shape[1], TEXT["vocab_size"])
    assert torch.equal(ours, theirs)


def test_config_token_ids_are_the_tokenizers(saved, processor):
    config = json.loads((saved / "config.json").read_text())
    tokenizer = processor.tokenizer
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for field, token in ids.items():
        assert config[field] == tokenizer.convert_tokens_to_ids(token), field
    assert (IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_START_ID, VISION_END_ID) == (103, 104, 101, 102)
    assert processor.image_token_id == IMAGE_PAD_ID
    assert config["text_config"]["eos_token_id"] == EOS_ID == tokenizer.eos_token_id
    assert config["text_config"]["pad_token_id"] == PAD_ID == tokenizer.pad_token_id
    assert len(VOCAB) <= config["text_config"]["vocab_size"]


def test_processor_expands_a_32_pixel_image_to_16_tokens(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                             {"type": "text", "text": "b"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\na<|vision_start|><|image_pad|><|vision_end|>b<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], images=[synthetic_image(2)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 4 * 4)
    assert (inputs["input_ids"] == IMAGE_PAD_ID).sum() == 16


def test_synthetic_images_are_seeded_and_encode_losslessly():
    import io

    import numpy as np
    from PIL import Image

    a, b = synthetic_image(3), synthetic_image(3, size=48)
    assert a.size == (32, 32) and b.size == (48, 48)
    assert np.array_equal(np.asarray(a), np.asarray(synthetic_image(3)))
    assert not np.array_equal(np.asarray(a), np.asarray(synthetic_image(4)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(a)))), np.asarray(a))


# ---- what SGLang may serve (facts measured with a real server: tests/sglang/test_vl_generate.py) --

def write_vl_config(folder, text=None, vision=None):
    config = json.loads(json.dumps(TINY_QWEN3_VL_MOE))
    config["text_config"].update(text or {})
    config["vision_config"].update(vision or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_tiny_vl_model_and_a_two_layer_one_are_servable(tmp_path):
    check_servable(write_vl_config(tmp_path / "tiny"))
    check_servable(write_vl_config(tmp_path / "two_layers", text={"num_hidden_layers": 2}))


@pytest.mark.parametrize("text, dense", [({"mlp_only_layers": [1]}, [1]),
                                         ({"decoder_sparse_step": 3}, [0, 1, 3, 4])])
def test_dense_vl_text_layers_are_refused(tmp_path, text, dense):
    folder = write_vl_config(tmp_path / "dense", text=text)
    with pytest.raises(UnservableModel) as info:
        check_servable(folder)
    assert f"text_config: layers {dense} are dense" in str(info.value)


@pytest.mark.parametrize("indexes", [[0, 3], [0, 1, 2, 3], []])
def test_deepstack_other_than_three_is_refused(tmp_path, indexes):
    folder = write_vl_config(tmp_path / "deepstack", vision={"deepstack_visual_indexes": indexes})
    with pytest.raises(UnservableModel, match=f"deepstack_visual_indexes has {len(indexes)} entries"):
        check_servable(folder)
