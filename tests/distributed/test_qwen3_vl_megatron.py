"""Qwen3-VL-MoE on Megatron-Core over 2 gloo ranks: logits and gradients against transformers.

The prompt holds two images of different sizes (non-square grids) between text, so the vision
tower, the patch and deepstack mergers, the interleaved multimodal RoPE and the merging of image
tokens under sequence parallelism are all on the path being compared.
"""

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_sapo import models, torchvision_compat
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.models import qwen3_vl
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>how many squares? "
          "<|vision_start|><|image_pad|><|vision_end|>and here?<|im_end|>\n<|im_start|>assistant\n3")


@pytest.fixture(scope="module")
def reference(tiny_vl):
    """transformers' model, the processor's inputs, and the model's logits on them."""
    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    from megatron_sapo.models.tiny_vl import synthetic_image

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_vl)
    inputs = processor(text=[PROMPT], images=[synthetic_image(1, 32), synthetic_image(2, 16)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


class VLLayout:
    def __init__(self, tiny_vl, tp=1, ep=1):
        self.parallel = ParallelConfig(tp=tp, ep=ep)
        self.pg = initialize_model_parallel(self.parallel)
        hf_config = models.read_hf_config(tiny_vl)
        self.spec = qwen3_vl.from_hf_config(hf_config, self.parallel)
        self.model = qwen3_vl.build_model(self.spec, self.pg)
        load_hf_into_model(self.model, HFCheckpoint(tiny_vl), models.weight_table(qwen3_vl, self.spec), self.pg)

    def logits(self, inputs, pixel_values=None):
        """Full-vocabulary logits ``[1, S, V]``; ``pixel_values`` replaces the processor's."""
        ids = inputs["input_ids"]
        seq = ids.shape[1]
        padded = -(-seq // self.parallel.tp) * self.parallel.tp  # sequence parallelism splits S evenly
        ids = torch.nn.functional.pad(ids, (0, padded - seq), value=0)
        positions = qwen3_vl.mrope_position_ids(ids, inputs["image_grid_thw"], image_token_id=self.spec.image_token_id,
                                                spatial_merge_size=self.spec.vision.spatial_merge_size)
        pixels = inputs["pixel_values"] if pixel_values is None else pixel_values
        local = self.model(ids, positions, None, pixel_values=pixels, image_grid_thw=inputs["image_grid_thw"])
        # Megatron's gather is differentiable, so gradients can flow back through it.
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local, group=self.pg.tp)
        return full[:, :seq, : self.spec.vocab_size]


@pytest.fixture
def vl_layout():
    yield VLLayout
    destroy_model_parallel()


@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 2)])
def test_image_prompt_logits_match_transformers(tiny_vl, reference, vl_layout, tp, ep):
    _, inputs, expected = reference
    layout = vl_layout(tiny_vl, tp=tp, ep=ep)
    layout.model.eval()
    with torch.no_grad():
        logits = layout.logits(inputs)
        blank = layout.logits(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
    diff = (logits - expected).abs().max().item()
    print(f"TP={tp} EP={ep}: max |logit diff| vs transformers {diff:.2e}")
    assert diff <= 1e-4
    # The images matter: other pixels change the logits after the first image.
    assert (blank - expected).abs().max().item() > 1e-3


def test_text_only_prompt_matches_transformers(tiny_vl, reference, vl_layout):
    model, _, _ = reference
    layout = vl_layout(tiny_vl, tp=2, ep=2)
    layout.model.eval()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        local = layout.model(tokens, torch.arange(12).expand(2, 12), None)
    logits = all_gather_cat(local, layout.pg.tp, dim=-1)[..., : layout.spec.vocab_size]
    assert (logits - expected).abs().max().item() <= 1e-4


def test_vision_gradients_match_transformers_at_tp2_ep2(tiny_vl, reference, vl_layout):
    """Backward through the text model, the deepstack additions and the tower, split over TP/EP."""
    model, inputs, _ = reference
    weights = torch.randn(reference[2].shape, generator=torch.Generator().manual_seed(4))
    model.zero_grad()
    (model(**inputs).logits * weights).sum().backward()
    layout = vl_layout(tiny_vl, tp=2, ep=2)
    (layout.logits(inputs) * weights).sum().backward()
    ours = dict(layout.model.named_parameters())
    theirs = dict(model.named_parameters())
    pairs = {
        "vision.patch_embed.weight": "model.visual.patch_embed.proj.weight",
        "vision.pos_embed.weight": "model.visual.pos_embed.weight",
        "vision.merger.linear_fc2.weight": "model.visual.merger.linear_fc2.weight",
        "vision.deepstack_mergers.0.linear_fc2.weight": "model.visual.deepstack_merger_list.0.linear_fc2.weight",
        "vision.deepstack_mergers.2.norm.weight": "model.visual.deepstack_merger_list.2.norm.weight",
    }
    for megatron_name, hf_name in pairs.items():
        expected = theirs[hf_name].grad.reshape(ours[megatron_name].shape)
        torch.testing.assert_close(ours[megatron_name].grad, expected, rtol=1e-4, atol=1e-5, msg=megatron_name)
