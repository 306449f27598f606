"""The supervised cold start on picture pairs: transformers' image-text model trains on the
processor's patches, and the checkpoint it rewrites keeps the Hub expert orientation."""

import pytest
import torch

from megatron_sapo import torchvision_compat
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.data.chat import encode_sft_examples
from megatron_sapo.data.tasks import get_task
from megatron_sapo.data.tiny_tokenizer import PAD_ID
from megatron_sapo.models.tiny_vl import TINY_QWEN3_VL_MOE, save_tiny_qwen3_vl_moe
from megatron_sapo.training.cold_start import cold_start

pytestmark = pytest.mark.unit


def test_picture_pairs_train_and_keep_the_hub_layout(tmp_path):
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = save_tiny_qwen3_vl_moe(tmp_path / "vl", seed=0)
    processor = AutoProcessor.from_pretrained(model_dir)
    records = get_task("tiny-count").records("sft", 0)[:8]
    examples = encode_sft_examples(records, processor.tokenizer, None, processor)
    assert all(e.vision is not None and e.vision.num_images == 1 for e in examples)
    before = HFCheckpoint(model_dir).get("model.visual.patch_embed.proj.weight")

    losses = cold_start(model_dir, examples, steps=6, batch_size=4, lr=3e-3, seed=0, pad_id=PAD_ID)

    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    saved = HFCheckpoint(model_dir)
    # The vision tower is trained too, and the experts are written as published checkpoints hold them.
    assert not torch.equal(saved.get("model.visual.patch_embed.proj.weight"), before)
    text = TINY_QWEN3_VL_MOE["text_config"]
    experts, hidden, width = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]
    assert saved.shape("model.language_model.layers.0.mlp.experts.gate_up_proj") == (experts, hidden, 2 * width)
    assert saved.shape("model.language_model.layers.0.mlp.experts.down_proj") == (experts, width, hidden)
    AutoModelForImageTextToText.from_pretrained(model_dir)  # and transformers loads it back
