"""Multimodal prompts from files and from the "tiny-count" task, through the tiny Qwen3-VL
processor (saved and reloaded), into train batches with images and multimodal positions."""

import copy
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_sapo.data.checks import check_data, reward_name
from megatron_sapo.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from megatron_sapo.data.chat import encode_records, image_messages
from megatron_sapo.data.datasets import MalformedRowsError, read_prompt_file
from megatron_sapo.data.records import PromptRecord
from megatron_sapo.data.synthetic import SPLITS
from megatron_sapo.data.tasks import get_task
from megatron_sapo.data.synthetic_vl import IMAGE_SIZE
from megatron_sapo.data.tiny_tokenizer import IMAGE_PAD_ID, PAD_ID, VISION_END_ID, VISION_START_ID
from megatron_sapo.models.tiny_vl import TINY_QWEN3_VL_MOE, png_bytes, synthetic_image
from megatron_sapo.training.batch import ImageLayout, build_train_batch
from megatron_sapo.types import Sample, VisionInputs

pytestmark = pytest.mark.unit

MERGE = TINY_QWEN3_VL_MOE["vision_config"]["spatial_merge_size"]
LAYOUT = ImageLayout(image_token_id=IMAGE_PAD_ID, spatial_merge_size=MERGE)
PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal patch * patch * patch of the tiny processor


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from megatron_sapo import torchvision_compat
    from megatron_sapo.models.tiny_vl import save_tiny_vl_processor

    torchvision_compat.ensure_importable()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(save_tiny_vl_processor(tmp_path_factory.mktemp("vl_processor")))


def image_file(path, seed: int, size: int = 32):
    path.write_bytes(png_bytes(synthetic_image(seed, size)))
    return path


# ---- files ------------------------------------------------------------------------------------

def test_jsonl_images_are_read_relative_to_the_file_and_text_rows_have_none(tmp_path):
    (tmp_path / "imgs").mkdir()
    a, b = image_file(tmp_path / "imgs" / "a.png", 1), image_file(tmp_path / "b.png", 2)
    path = tmp_path / "data" / "p.jsonl"
    path.parent.mkdir()
    rows = [{"prompt": "<image>count?", "answer": "1", "images": ["../imgs/a.png"]},
            {"prompt": "no picture", "answer": "2"},
            {"prompt": "both: <image> and <image>", "answer": "3", "images": [str(b), "../imgs/a.png"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_prompt_file(path)
    assert [r.images for r in records] == [(a.read_bytes(),), (), (b.read_bytes(), a.read_bytes())]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_bad_images_are_listed_with_file_line_and_the_missing_file(tmp_path):
    image_file(tmp_path / "ok.png", 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "<image>?", "answer": "1", "images": ["ok.png"]},
            {"prompt": "<image>?", "answer": "1", "images": ["missing.png"]},
            {"prompt": "<image>?", "answer": "1", "images": ["broken.png"]},
            {"prompt": "<image>?", "answer": "1", "images": "ok.png"},
            {"prompt": "<image> <image>", "answer": "1", "images": ["ok.png"]},
            {"prompt": [{"role": "system", "content": "<image>"}, {"role": "user", "content": "hi"}],
             "answer": "1", "images": ["ok.png"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(MalformedRowsError) as excinfo:
        read_prompt_file(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: 5 malformed row(s)")
    assert (f"{path}:2: field 'images', image 1: no image file 'missing.png' (looked for "
            f"{tmp_path / 'missing.png'})") in message
    assert f"{path}:3: field 'images', image 1 is not a readable image" in message
    assert f"{path}:4: field 'images' must be a list of image files, got 'ok.png'" in message
    assert f"{path}:5: field 'images': the prompt has 2 <image> marker(s) but 1 image(s)" in message
    assert f"{path}:6: field 'images': <image> markers may only appear in user messages" in message


def test_parquet_images_as_bytes_and_as_hugging_face_image_structs(tmp_path):
    first, second = png_bytes(synthetic_image(3)), image_file(tmp_path / "s.png", 4)
    table = pa.table({"prompt": ["<image>a", "b", "<image>c"], "answer": ["1", "2", "3"],
                      "pics": [[{"bytes": first, "path": None}], None, [{"bytes": None, "path": "s.png"}]]})
    pq.write_table(table, tmp_path / "p.parquet")
    records = read_prompt_file(tmp_path / "p.parquet", image_key="pics")
    assert [r.images for r in records] == [(first,), (), (second.read_bytes(),)]
    raw = pa.table({"prompt": ["<image>x"], "answer": ["1"], "images": [[first]]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    assert read_prompt_file(tmp_path / "raw.parquet")[0].images == (first,)
    assert read_prompt_file(tmp_path / "raw.parquet", image_key="absent")[0].images == ()


# ---- chat template and processor -------------------------------------------------------------

def test_image_markers_become_image_parts_in_order():
    assert image_messages("<image>How many?", 1) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert image_messages("a <image> b <image>", 2, system_prompt="S") == [
        {"role": "system", "content": [{"type": "text", "text": "S"}]},
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "image"},
                                     {"type": "text", "text": " b "}, {"type": "image"}]}]
    unmarked = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "x"}, {"role": "user", "content": "q2"}]
    parts = image_messages(unmarked, 2)
    assert parts[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q1"}]
    assert parts[3]["content"] == [{"type": "text", "text": "q2"}]


def test_image_prompts_are_expanded_by_the_processor_and_text_prompts_keep_the_tokenizer_path(processor):
    tokenizer = processor.tokenizer
    small, wide = png_bytes(synthetic_image(5, 32)), png_bytes(synthetic_image(6, 48))
    records = [PromptRecord(0, "<image>How many squares?", "3", "f:1", images=(small,)),
               PromptRecord(1, "rev 12=", "21", "f:2"),
               PromptRecord(2, "left <image> right <image>", "0", "f:3", images=(wide, small))]
    encoded = encode_records(records, tokenizer, None, max_prompt_tokens=200, processor=processor)
    first, text, both = encoded.prompts
    assert [p.index for p in encoded.prompts] == [0, 1, 2]

    # One placeholder per image, expanded to (h/2)*(w/2) merged patches: 32x32 -> 8x8 patches -> 16 tokens.
    expected = [VISION_START_ID] + [IMAGE_PAD_ID] * 16 + [VISION_END_ID]
    start = first.prompt_ids.index(VISION_START_ID)
    assert first.prompt_ids[start:start + 18] == expected
    assert tokenizer.decode(first.prompt_ids[start + 18:]) == "How many squares?<|im_end|>\n<|im_start|>assistant\n"
    assert first.vision.image_grid_thw.tolist() == [[1, 8, 8]]
    assert tuple(first.vision.pixel_values.shape) == (64, PATCH_DIM)
    assert first.images == [small]
    # The same pixels the processor computes for the image alone.
    alone = processor.image_processor(images=[synthetic_image(5, 32)], return_tensors="pt")
    assert torch.equal(first.vision.pixel_values, alone["pixel_values"])

    assert text.vision is None and text.images is None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "rev 12="}], tokenize=False,
                                             add_generation_prompt=True)
    assert text.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    assert both.vision.image_grid_thw.tolist() == [[1, 12, 12], [1, 8, 8]]  # image order = marker order
    assert both.prompt_ids.count(IMAGE_PAD_ID) == 36 + 16
    assert both.vision.pixel_values.shape[0] == 144 + 64


def test_image_prompts_need_a_processor_and_count_their_image_tokens_against_the_limit(processor):
    record = PromptRecord(0, "<image>?", "1", "f.jsonl:4", images=(png_bytes(synthetic_image(0)),))
    with pytest.raises(ValueError, match="f.jsonl:4: the problem has images but the model has no multimodal processor"):
        encode_records([record], processor.tokenizer, None, 100)
    assert encode_records([record], processor.tokenizer, None, 20, processor).too_long == ["f.jsonl:4"]


# ---- the synthetic image task ----------------------------------------------------------------

def count_squares(png: bytes) -> int:
    """Connected regions (4-neighbour) of pixels that differ from the most common colour."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = [[image.getpixel((x, y)) for x in range(image.width)] for y in range(image.height)]
    background = Counter(p for row in pixels for p in row).most_common(1)[0][0]
    seen, regions = set(), 0
    for y in range(image.height):
        for x in range(image.width):
            if pixels[y][x] == background or (x, y) in seen:
                continue
            regions += 1
            stack = [(x, y)]
            while stack:
                cx, cy = stack.pop()
                if (cx, cy) in seen or not (0 <= cx < image.width and 0 <= cy < image.height):
                    continue
                if pixels[cy][cx] == background:
                    continue
                seen.add((cx, cy))
                stack += [(cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)]
    return regions


def test_counting_task_is_deterministic_disjoint_and_its_answers_match_the_pictures():
    task = get_task("tiny-count")
    splits = {split: task.records(split, seed=3) for split in SPLITS}
    assert splits == {split: task.records(split, seed=3) for split in SPLITS}
    assert task.records("train", seed=4) != splits["train"]
    pictures = [r.images for records in splits.values() for r in records]
    assert len(pictures) == 1200 and len(set(pictures)) == 1200  # every picture once, in one split
    assert len(splits["val"]) == len(splits["sft"]) == 240
    assert Counter(r.answer for r in task.records("val", seed=0)).keys() == {"1", "2", "3", "4"}
    for record in splits["val"][:60]:
        assert record.prompt == "<image>How many squares?" and len(record.images) == 1
        assert count_squares(record.images[0]) == int(record.answer), record.source
    from PIL import Image

    assert Image.open(io.BytesIO(splits["train"][0].images[0])).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert task.reward == "math" and task.has_images and not get_task("tiny-reverse").has_images


def test_image_tasks_refuse_text_only_builtin_models():
    def config(**changes):
        fields = dict(model=ModelConfig(builtin="tiny-qwen3-vl-moe", params_dtype="fp32"),
                      data=DataConfig(task="tiny-count", max_prompt_tokens=64), train=TrainConfig(max_seq_len=2048))
        cfg = RunConfig(**{**fields, **changes})
        check_data(cfg)
        return cfg

    assert reward_name(config().data) == "math"
    assert config(train=TrainConfig(sft_steps=5, max_seq_len=2048)).train.sft_steps == 5  # image cold start
    with pytest.raises(ConfigError, match="model.builtin = 'tiny-qwen3-moe' cannot read"):
        config(model=ModelConfig(builtin="tiny-qwen3-moe"))


# ---- train batches ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl_prompts(processor):
    records = [PromptRecord(0, "<image>How many squares?", "3", "f:1", images=(png_bytes(synthetic_image(7)),)),
               PromptRecord(1, "rev 12=", "21", "f:2"),
               PromptRecord(2, "a <image> b <image>", "0", "f:3",
                            images=(png_bytes(synthetic_image(8, 48)), png_bytes(synthetic_image(9))))]
    return encode_records(records, processor.tokenizer, None, 200, processor).prompts


def sample(prompt, response):
    return Sample(prompt_ids=list(prompt.prompt_ids), response_ids=response, rollout_logprobs=[-0.5] * len(response),
                  finish_reason="stop")


def hf_rope_index(tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """transformers' own multimodal positions for the tiny config (the reference)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeModel

    fields = copy.deepcopy(TINY_QWEN3_VL_MOE)
    fields.pop("architectures"), fields.pop("model_type")
    model = Qwen3VLMoeModel(Qwen3VLMoeConfig(**fields))
    positions, _ = model.get_rope_index(tokens, (tokens == IMAGE_PAD_ID).int(), image_grid_thw=grid)
    return positions


def test_batch_carries_each_rows_images_and_transformers_positions(vl_prompts):
    image, text, two = vl_prompts
    samples = [sample(image, [40, 41, 99]), sample(text, [50, 99]), sample(two, [42, 99]), sample(image, [43])]
    vision = [image.vision, text.vision, two.vision, image.vision]
    batch = build_train_batch(samples, [1.0, -1.0, 0.5, 0.0], PAD_ID, vision=vision, layout=LAYOUT)

    assert batch.vision == vision
    assert batch.position_ids.shape == (3, 4, batch.tokens.shape[1])
    grid = torch.cat([image.vision.image_grid_thw, two.vision.image_grid_thw, image.vision.image_grid_thw])
    assert torch.equal(batch.position_ids, hf_rope_index(batch.tokens, grid))
    assert torch.equal(batch.position_ids[:, 1], torch.arange(batch.tokens.shape[1]).expand(3, -1))  # text row

    picked = batch.select(torch.tensor([2, 0]))
    assert picked.vision == [two.vision, image.vision]
    assert torch.equal(picked.position_ids, batch.position_ids[:, [2, 0]])
    images = picked.vision_inputs
    assert torch.equal(images.pixel_values, torch.cat([two.vision.pixel_values, image.vision.pixel_values]))
    assert images.image_grid_thw.tolist() == [[1, 12, 12], [1, 8, 8], [1, 8, 8]]
    assert batch.select(slice(1, 2)).vision_inputs is None  # the text-only row
    assert batch.select(torch.tensor([False, True, True, False])).vision == [text.vision, two.vision]


def test_generated_image_tokens_are_inputs_as_padding_and_end_the_loss(vl_prompts):
    image, text, _ = vl_prompts
    response = [40, IMAGE_PAD_ID, 41, IMAGE_PAD_ID, 99]
    samples = [sample(image, response), sample(text, [50, 51, 99])]
    batch = build_train_batch(samples, [1.0, -1.0], PAD_ID, vision=[image.vision, None], layout=LAYOUT)
    first = len(image.prompt_ids)
    assert batch.tokens[0, first:first + 5].tolist() == [40, PAD_ID, 41, PAD_ID, 99]
    assert batch.targets[0, first - 1:first + 4].tolist() == response  # the token itself is still a target
    assert batch.loss_mask[0].nonzero().flatten().tolist() == [first - 1, first]
    assert batch.loss_mask[1].sum() == 3
    assert int((batch.tokens == IMAGE_PAD_ID).sum()) == 16  # only the prompt's image tokens are left


def test_batch_refuses_images_that_do_not_match_the_prompt(vl_prompts):
    image, text, two = vl_prompts
    with pytest.raises(ValueError, match="sample 0: its prompt has 16 image tokens but its images make 52"):
        build_train_batch([sample(image, [1])], [0.0], PAD_ID, vision=[two.vision], layout=LAYOUT)
    with pytest.raises(ValueError, match="samples carry images but no ImageLayout was given"):
        build_train_batch([sample(image, [1])], [0.0], PAD_ID, vision=[image.vision])
    text_batch = build_train_batch([sample(text, [1, 2])], [0.0], PAD_ID)
    assert text_batch.position_ids is None and text_batch.vision is None


def test_vision_inputs_check_their_shapes():
    with pytest.raises(ValueError, match=r"pixel_values has shape \(10, 96\), expected \[64 patches"):
        VisionInputs(pixel_values=torch.zeros(10, 96), image_grid_thw=torch.tensor([[1, 8, 8]]))
    with pytest.raises(ValueError, match=r"image_grid_thw has shape \(1, 2\)"):
        VisionInputs(pixel_values=torch.zeros(64, 96), image_grid_thw=torch.tensor([[8, 8]]))
    assert VisionInputs.concat([None, None]) is None


def test_forward_step_feeds_a_microbatch_its_own_images_and_positions(vl_prompts):
    """The schedule's forward step, with a model that records its call: text batches keep the
    three-argument call; vision batches add [3, b, S] positions (sequence-parallel padding
    continues each row) and only the microbatch's images; packed rows get their positions one
    row after another, their images in row order and a block-diagonal causal mask."""
    from megatron_sapo.training.forward import token_forward_step
    from megatron_sapo.training.microbatch import build_microbatch

    image, text, two = vl_prompts
    samples = [sample(image, [40, 99]), sample(two, [41, 99]), sample(text, [42])]
    batch = build_train_batch(samples, [1.0, -1.0, 0.0], PAD_ID, vision=[image.vision, two.vision, None],
                              layout=LAYOUT)
    calls = []

    def model(*args, **kwargs):
        calls.append((args, kwargs))
        return torch.zeros(args[0].shape[0], args[0].shape[1], 5)

    step = token_forward_step(lambda logits, micro: logits)
    micro = build_microbatch(batch, [1, 2], pack=False, multiple=8)
    step(iter([micro]), model)
    (tokens, positions, mask), kwargs = calls[-1]
    length = max(len(samples[1].tokens), len(samples[2].tokens))
    padded = -(-length // 8) * 8
    assert mask is None and tokens.shape == (2, padded) and padded > length
    assert torch.equal(positions[:, :, :length], batch.position_ids[:, 1:3, :length])
    last = batch.position_ids[:, 1:3, length - 1:length]
    assert torch.equal(positions[:, :, length:], last + torch.arange(1, padded - length + 1))
    assert torch.equal(kwargs["pixel_values"], two.vision.pixel_values)
    assert torch.equal(kwargs["image_grid_thw"], two.vision.image_grid_thw)

    step(iter([build_microbatch(batch, [2], pack=False, multiple=1)]), model)  # a text-only row: no images
    assert calls[-1][1] == {}

    step(iter([build_microbatch(batch, [0, 1, 2], pack=True, multiple=1)]), model)
    (tokens, positions, mask), kwargs = calls[-1]
    lengths = [len(s.tokens) for s in samples]
    assert tokens.shape == (1, sum(lengths))
    assert torch.equal(tokens[0], torch.cat([batch.tokens[i, :n] for i, n in enumerate(lengths)]))
    assert torch.equal(positions[:, 0], torch.cat([batch.position_ids[:, i, :n] for i, n in enumerate(lengths)], 1))
    assert torch.equal(kwargs["pixel_values"], torch.cat([image.vision.pixel_values, two.vision.pixel_values]))
    first, second = lengths[0], lengths[0] + lengths[1]
    assert mask.shape == (1, 1, sum(lengths), sum(lengths))
    assert not mask[0, 0, first, first] and mask[0, 0, first, first - 1]  # a row sees itself, not the one before
    assert mask[0, 0, first, first + 1] and not mask[0, 0, second - 1, first]  # causal inside a row

    text_batch = build_train_batch([sample(text, [42])], [0.0], PAD_ID)
    step(iter([build_microbatch(text_batch, [0], pack=False, multiple=1)]), model)
    (tokens, positions, mask), kwargs = calls[-1]
    assert kwargs == {} and mask is None
    assert torch.equal(positions, torch.arange(tokens.shape[1]).expand_as(tokens))
