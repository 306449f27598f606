"""Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B) on Megatron-Core: config derivation, model, weight table.

The model is a vision tower feeding a Qwen3-MoE text model:

* **Vision tower** (first pipeline stage only): patches ``[N, C*T*P*P]`` -> linear patch
  embedding (the HF ``Conv3d`` has kernel = stride, so it is one matrix) + a learned
  ``side x side`` position table resampled bilinearly (corners aligned) to each image's grid ->
  ViT blocks (Megatron ``TransformerLayer``s: LayerNorm, biased QKV/MLP, tanh-GELU, 2-D RoPE
  over (row, column), attention within each image only), tensor-parallel like the text model ->
  a *patch merger* concatenating each ``m x m`` block of patches (the processor emits patches
  block by block) into one text-sized token. *Deepstack* mergers do the same to the outputs of
  the blocks listed in ``deepstack_visual_indexes``.
* **Text model**: a ``GPTModel`` (Qwen3-MoE layers, see ``qwen3_moe``) whose input embeddings
  take the merged image tokens at the ``<|image_pad|>`` positions, whose layer ``i < 3`` output
  gets deepstack feature ``i`` added at those positions (the features travel through the
  decoder as its layers' ``context`` input, so layers recomputed in backward get them too), and
  whose RoPE is *interleaved multimodal*: each rotary frequency ``j`` reads the temporal, row or
  column position of the token (``j % 3 == 1`` and ``j < 3*s_h``: row; ``j % 3 == 2`` and
  ``j < 3*s_w``: column; else temporal), where text tokens have all three equal
  (``mrope_position_ids``).

Under sequence parallelism the text model holds ``S/tp`` positions per rank; image features
are laid out over the whole sequence and cut the same way before they are merged in.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megatron_sapo.config import ConfigError, ParallelConfig, RouterConfig
from megatron_sapo.convert.mapping import MappingTable, WeightMap
from megatron_sapo.convert.sharding import Split
from megatron_sapo.convert.transforms import FlattenPatchConv, SplitFusedQKV
from megatron_sapo.models import qwen3_moe
from megatron_sapo.models.qwen3_moe import Qwen3MoeSpec, read_hf_config

if TYPE_CHECKING:  # annotations only: Megatron is imported when a model is built
    from megatron.core.transformer import TransformerConfig

ARCHITECTURES = ("Qwen3VLMoeForConditionalGeneration",)
MODEL_TYPE = "qwen3_vl_moe"


@dataclass(frozen=True)
class VisionSpec:
    config: TransformerConfig
    """Of the ViT blocks."""
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    num_position_embeddings: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float

    @property
    def patch_dim(self) -> int:
        """Values per patch row of ``pixel_values``: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class Qwen3VLSpec:
    text: Qwen3MoeSpec
    vision: VisionSpec
    image_token_id: int
    vision_start_token_id: int
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    fused_experts: bool = True
    """The Hub stores each layer's experts fused (see ``convert/hf_layout.py``)."""

    # What generic code reads from any model spec.
    @property
    def config(self):
        return self.text.config

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.text.padded_vocab_size

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return self.text.moe_layers

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings


def check_architecture(hf: dict, source: str = "config.json") -> None:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != MODEL_TYPE and not set(archs) & set(ARCHITECTURES):
        raise ConfigError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; this module handles "
            f"{', '.join(ARCHITECTURES)} (model_type {MODEL_TYPE!r})")
    for key in ("text_config", "vision_config"):
        if not isinstance(hf.get(key), dict):
            raise ConfigError(f"{source}: a Qwen3-VL-MoE config needs a {key!r} object")


def from_hf_config(
    hf: dict,
    parallel: ParallelConfig,
    *,
    router: RouterConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    vocab_divisor: int = 128,
    use_te: bool = False,
) -> Qwen3VLSpec:
    """Derive the Megatron-Core configs (text and vision) of a Qwen3-VL-MoE ``config.json``."""
    check_architecture(hf)
    text_hf = dict(hf["text_config"])
    # The VL text router always renormalises its top-k probabilities (no norm_topk_prob field).
    text_hf["norm_topk_prob"] = True
    # Whether lm_head shares the embedding is the top-level field (the text_config's is unused).
    text_hf["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    rope = text_hf.get("rope_parameters") or text_hf.get("rope_scaling") or {}
    section = tuple(rope.get("mrope_section") or ())
    head_dim = text_hf.get("head_dim") or text_hf["hidden_size"] // text_hf["num_attention_heads"]
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(f"config.json: text_config rope mrope_section {list(section)} must have 3 entries summing "
                          f"to head_dim/2 = {head_dim // 2}")
    text = qwen3_moe.text_model_spec(text_hf, parallel, router=router, params_dtype=params_dtype,
                                     vocab_divisor=vocab_divisor, use_te=use_te,
                                     extra_fields=dict(mrope_section=list(section)))
    text = dataclasses.replace(text, fused_experts=True)
    vision = _vision_spec(hf["vision_config"], parallel, params_dtype, use_te)
    deepstack = len(vision.deepstack_visual_indexes)
    per_stage = text.config.num_layers // parallel.pp
    if deepstack > per_stage:
        raise ConfigError(f"{deepstack} deepstack layers must sit on the first pipeline stage, which holds "
                          f"{per_stage} of {text.config.num_layers} text layers at parallel.pp={parallel.pp}")
    if vision.out_hidden_size != text.config.hidden_size:
        raise ConfigError(f"config.json: vision_config.out_hidden_size={vision.out_hidden_size} differs from "
                          f"text_config.hidden_size={text.config.hidden_size}")
    return Qwen3VLSpec(
        text=text,
        vision=vision,
        image_token_id=_require(hf, "image_token_id"),
        vision_start_token_id=_require(hf, "vision_start_token_id"),
        mrope_section=section,
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
    )


def _vision_spec(hf: dict, parallel: ParallelConfig, params_dtype: torch.dtype, use_te: bool) -> VisionSpec:
    from megatron.core.transformer.transformer_config import TransformerConfig

    hidden = _require(hf, "hidden_size", "vision_config")
    heads = hf.get("num_heads") or _require(hf, "num_attention_heads", "vision_config")
    if heads % parallel.tp:
        raise ConfigError(f"vision_config.num_heads={heads} is not divisible by parallel.tp={parallel.tp}")
    if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"vision_config.hidden_act={hf['hidden_act']!r} is not supported (gelu_pytorch_tanh)")
    config = TransformerConfig(
        num_layers=_require(hf, "depth", "vision_config"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=_require(hf, "intermediate_size", "vision_config"),
        normalization="LayerNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        # The tower runs whole on the first pipeline stage, every image's patches on every TP rank.
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # The tower calls its blocks one by one (deepstack features are taken between them), so
        # under either recompute it recomputes their attention, its largest activation.
        recompute_granularity=None if parallel.recompute == "none" else "selective",
    )
    rope = hf.get("rope_parameters") or {}
    return VisionSpec(
        config=config,
        in_channels=hf.get("in_channels", 3),
        patch_size=_require(hf, "patch_size", "vision_config"),
        temporal_patch_size=_require(hf, "temporal_patch_size", "vision_config"),
        spatial_merge_size=_require(hf, "spatial_merge_size", "vision_config"),
        num_position_embeddings=_require(hf, "num_position_embeddings", "vision_config"),
        out_hidden_size=_require(hf, "out_hidden_size", "vision_config"),
        deepstack_visual_indexes=tuple(hf.get("deepstack_visual_indexes") or ()),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


# ----------------------------------------------------------------------------------------------
# Positions


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *, image_token_id: int,
                       spatial_merge_size: int) -> torch.Tensor:
    """Multimodal RoPE positions ``[3, B, S]`` (temporal, row, column) of ``input_ids`` ``[B, S]``.

    Text tokens count up on all three axes. The ``t*h*w / m**2`` placeholder tokens of an image
    (images consumed in order through the rows) take ``start + (frame, row, column)`` of its
    merged grid, and the text after it resumes at ``start + max(h, w) / m``.
    """
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    batch, seq = input_ids.shape
    ids_BS = input_ids.cpu()
    positions = torch.empty(3, batch, seq, dtype=torch.long)
    for row in range(batch):
        is_image_S = ids_BS[row] == image_token_id
        # How far each token moves the position: 1 for text; an image, as a whole, max(h, w) / m
        # (put on its last placeholder). A token's start is the sum over the tokens before it.
        step_S = (~is_image_S).long()
        images = []  # (first placeholder, count, merged grid)
        image_starts = is_image_S.nonzero().flatten().tolist()
        i = image_starts[0] if image_starts else seq
        while i < seq:
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"row {row}: image placeholder at position {i} but image_grid_thw has no "
                                 "image left") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            count = t * gh * gw
            if i + count > seq or not bool(is_image_S[i:i + count].all()):
                raise ValueError(f"row {row}: the image at position {i} has grid {[t, h, w]}, i.e. {count} "
                                 "placeholder tokens, but fewer follow")
            images.append((i, count, (t, gh, gw)))
            step_S[i + count - 1] += max(gh, gw)
            later = is_image_S[i + count:].nonzero()
            i = i + count + int(later[0]) if len(later) else seq
        start_S = step_S.cumsum(0) - step_S
        positions[:, row] = start_S
        for i, count, (t, gh, gw) in images:
            frame, r, c = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            positions[:, row, i:i + count] = start_S[i] + torch.stack([frame, r, c]).reshape(3, -1)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw lists more images than the tokens hold")
    return positions.to(input_ids.device)


def _mrope_axis_of_frequency(section: tuple[int, int, int], frequencies: int) -> torch.Tensor:
    """For each rotary frequency, the position axis it reads: 0 temporal, 1 row, 2 column."""
    j = torch.arange(frequencies)
    axis = torch.zeros(frequencies, dtype=torch.long)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


@functools.cache  # one class per process: built on first use (it subclasses Megatron's)
def _interleaved_mrope_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (MultimodalRotaryEmbedding,
                                                                             get_pos_emb_on_this_cp_rank)

    class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
        """Megatron's multimodal RoPE with Qwen3-VL's interleaved assignment of frequencies to axes."""

        def forward(self, position_ids, mrope_section, cp_group=None):
            freqs = position_ids.to(self.inv_freq.device).float()[..., None] * self.inv_freq.float()  # [3, B, S, F]
            axis = _mrope_axis_of_frequency(tuple(mrope_section), freqs.shape[-1]).to(freqs.device)
            chosen = freqs.gather(0, axis.expand(1, *freqs.shape[1:])).squeeze(0)  # [B, S, F]
            emb = torch.cat([chosen, chosen], dim=-1)[:, :, None, :].transpose(0, 1).contiguous()  # [S, B, 1, 2F]
            cp_group = cp_group if cp_group is not None else self.cp_group
            if cp_group is not None and cp_group.size() > 1:
                emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
            return emb

    return InterleavedMultimodalRotaryEmbedding


def vision_position_embedding_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[N, 4]`` into the flattened ``side x side`` position table and bilinear weights
    ``[N, 4]`` (corners aligned) for every patch of every image, in the processor's patch order
    (``m x m`` blocks, row-major within and between blocks, frames one after another)."""
    indices, weights = [], []
    for t, h, w in grid_thw.tolist():
        rows, row_w = _linear_taps(h, side)
        cols, col_w = _linear_taps(w, side)
        index = rows[:, None, :, None] * side + cols[None, :, None, :]  # [h, w, 2, 2]
        weight = row_w[:, None, :, None] * col_w[None, :, None, :]
        indices.append(_merge_block_order(index.reshape(h, w, 4), merge).repeat(t, 1))
        weights.append(_merge_block_order(weight.reshape(h, w, 4), merge).repeat(t, 1))
    return torch.cat(indices), torch.cat(weights)


def _linear_taps(size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation of ``size`` points over a table of ``side`` entries, ends aligned."""
    source = torch.arange(size, dtype=torch.float32) * (side - 1) / max(size - 1, 1)
    low = source.floor()
    frac = source - low
    taps = torch.stack([low.long(), (low.long() + 1).clamp(max=side - 1)], dim=-1)
    return taps, torch.stack([1 - frac, frac], dim=-1)


def _merge_block_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """``[h, w, ...]`` -> ``[h*w, ...]`` listing ``merge x merge`` blocks one after another."""
    h, w, *rest = grid.shape
    blocks = grid.reshape(h // merge, merge, w // merge, merge, *rest).transpose(1, 2)
    return blocks.reshape(h * w, *rest)


def vision_rotary_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) ``[N, 2]`` of every patch, in the processor's patch order."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out.append(_merge_block_order(torch.stack([rows, cols], dim=-1), merge).repeat(t, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Modules


def vision_layer_spec(use_te: bool):
    """A ViT block: pre-LayerNorm attention and GELU MLP, biased, attention under an explicit mask."""
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te:
        from megatron.core.extensions.transformer_engine import (TEDotProductAttention,
                                                                 TELayerNormColumnParallelLinear, TERowParallelLinear)
        column, row, attention, norm = TELayerNormColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, \
            IdentityOp
    else:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        column, row, attention, norm = ColumnParallelLinear, RowParallelLinear, DotProductAttention, WrappedTorchNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=attention, linear_proj=row),
            ),
            self_attn_bda=_bias_dropout_add(),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=_bias_dropout_add(),
        ),
    )


def _bias_dropout_add():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return get_bias_dropout_add


class PatchMerger(torch.nn.Module):
    """``m x m`` neighbouring patches -> one token: LayerNorm (per patch, or on the concatenation
    for deepstack mergers), Linear, exact GELU, Linear to the text width."""

    def __init__(self, hidden: int, merge: int, out_hidden: int, norm_after_concat: bool):
        super().__init__()
        self.concat = hidden * merge**2
        self.norm_after_concat = norm_after_concat
        self.norm = torch.nn.LayerNorm(self.concat if norm_after_concat else hidden, eps=1e-6)
        self.linear_fc1 = torch.nn.Linear(self.concat, self.concat)
        self.linear_fc2 = torch.nn.Linear(self.concat, out_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.norm_after_concat:
            merged = self.norm(patches.reshape(-1, self.concat))
        else:
            merged = self.norm(patches).reshape(-1, self.concat)
        return self.linear_fc2(F.gelu(self.linear_fc1(merged)))


@functools.cache  # one class per process: built on first use (it subclasses Megatron's)
def _vision_tower_class():
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_block import TransformerBlock

    class VisionTower(MegatronModule):
        """Pixels of all images of a batch -> merged image tokens and deepstack features."""

        def __init__(self, spec: VisionSpec, pg_collection, use_te: bool):
            super().__init__(config=spec.config)
            self.spec = spec
            cfg = spec.config
            self.tp_group = pg_collection.tp
            self.patch_embed = torch.nn.Linear(spec.patch_dim, cfg.hidden_size, dtype=cfg.params_dtype)
            self.pos_embed = torch.nn.Embedding(spec.num_position_embeddings, cfg.hidden_size, dtype=cfg.params_dtype)
            self.side = int(round(spec.num_position_embeddings**0.5))
            if self.side**2 != spec.num_position_embeddings:
                raise ConfigError(f"vision_config.num_position_embeddings={spec.num_position_embeddings} is not a "
                                  "square")
            self.blocks = TransformerBlock(cfg, vision_layer_spec(use_te), post_layer_norm=False,
                                           pg_collection=pg_collection)
            merge, out = spec.spatial_merge_size, spec.out_hidden_size
            self.merger = PatchMerger(cfg.hidden_size, merge, out, norm_after_concat=False).to(cfg.params_dtype)
            self.deepstack_mergers = torch.nn.ModuleList(
                PatchMerger(cfg.hidden_size, merge, out, norm_after_concat=True).to(cfg.params_dtype)
                for _ in spec.deepstack_visual_indexes)
            head_dim = cfg.kv_channels
            axis_dim = head_dim // 2
            inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
            spec, device = self.spec, self.patch_embed.weight.device
            if pixel_values.ndim != 2 or pixel_values.shape[1] != spec.patch_dim:
                raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                                 f"[patches, {spec.patch_dim}] (C*T*P*P from vision_config)")
            patches = int(grid_thw.prod(-1).sum())
            if pixel_values.shape[0] != patches:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                                 f"{grid_thw.tolist()} describes {patches}")
            grid = grid_thw.cpu()
            hidden = self.patch_embed(pixel_values.to(device, self.patch_embed.weight.dtype))
            index, weight = vision_position_embedding_taps(grid, self.side, spec.spatial_merge_size)
            hidden = hidden + (self.pos_embed(index.to(device)) * weight.to(device, hidden.dtype)[..., None]).sum(1)
            rows_cols = vision_rotary_positions(grid, spec.spatial_merge_size).to(device).float()
            freqs = (rows_cols[..., None] * self.inv_freq).reshape(patches, -1)  # [N, head_dim/2]: rows, then cols
            rotary = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
            mask = _block_diagonal_mask(grid, device)
            hidden = hidden[:, None, :]  # [N, 1, D]: Megatron's [sequence, batch, hidden]
            deepstack = []
            for index, layer in enumerate(self.blocks.layers):
                hidden, _ = layer(hidden, attention_mask=mask, rotary_pos_emb=rotary)
                if index in spec.deepstack_visual_indexes:
                    merger = self.deepstack_mergers[spec.deepstack_visual_indexes.index(index)]
                    deepstack.append(merger(hidden[:, 0]))
            return self.merger(hidden[:, 0]), deepstack

    return VisionTower


def _block_diagonal_mask(grid_thw: torch.Tensor, device) -> torch.Tensor:
    """``[1, 1, N, N]`` True where attention is *not* allowed: between patches of different frames."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    return (owner[:, None] != owner[None, :])[None, None]


@functools.cache  # one class per process: built on first use (it subclasses Megatron's)
def _vl_model_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class Qwen3VLModel(MegatronModule):
        """Vision tower + Qwen3-MoE ``GPTModel`` with deepstack and interleaved multimodal RoPE."""

        def __init__(self, spec: Qwen3VLSpec, pg_collection, *, use_te: bool, pp_rank: int):
            super().__init__(config=spec.config)
            self.spec = spec
            self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules ask every model
            self.tp_group = pg_collection.tp
            self.pre_process = pp_rank == 0
            self.post_process = pp_rank == spec.config.pipeline_model_parallel_size - 1
            if self.pre_process:
                self.vision = _vision_tower_class()(spec.vision, pg_collection, use_te)
            self.language_model = qwen3_moe.build_model(spec.text, pg_collection, use_te=use_te, pp_rank=pp_rank,
                                                        position_embedding_type="mrope")
            if spec.mrope_interleaved:
                old = self.language_model.rotary_pos_emb
                rope = _interleaved_mrope_class()(kv_channels=spec.config.kv_channels, rotary_percent=1.0,
                                                  rotary_base=int(spec.text.rotary_base), cp_group=old.cp_group)
                self.language_model.rotary_pos_emb = rope.to(old.inv_freq.device)
            if self.pre_process:
                for index in range(len(spec.vision.deepstack_visual_indexes)):
                    self.language_model.decoder.layers[index].register_forward_hook(self._add_deepstack(index))

        @property
        def decoder(self):
            return self.language_model.decoder

        def set_input_tensor(self, input_tensor) -> None:
            self.language_model.set_input_tensor(input_tensor)

        def forward(self, input_ids, position_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None,
                    **kwargs):
            if position_ids.ndim == 2:  # text only: the three axes are the same
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            decoder_input, deepstack = None, None
            if self.pre_process:
                decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)
                if pixel_values is not None:
                    decoder_input, deepstack = self._merge_images(decoder_input, input_ids, pixel_values,
                                                                  image_grid_thw)
            # The deepstack features travel as the decoder's cross-attention ``context``, which its
            # layers (without cross attention) pass on unchanged: see ``_add_deepstack``.
            blocks = {"context": torch.stack(deepstack)} if deepstack else None
            return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                       extra_block_kwargs=blocks, **kwargs)

        def _merge_images(self, embeddings, input_ids, pixel_values, image_grid_thw):
            """The embeddings with the image tokens put in at the placeholders, and the deepstack
            features laid out like them (``[S(/tp), B, H]`` each, zeros off the images)."""
            image_tokens, deepstack = self.vision(pixel_values, image_grid_thw)
            is_image = input_ids == self.spec.image_token_id  # [B, S]
            if int(is_image.sum()) != image_tokens.shape[0]:
                raise ValueError(f"input_ids hold {int(is_image.sum())} image placeholders but the images give "
                                 f"{image_tokens.shape[0]} tokens")
            mask = self._to_sequence_parallel(is_image.transpose(0, 1).unsqueeze(-1))  # [S(/tp), B, 1]
            features = [self._to_sequence_parallel(self._scatter(is_image, f.to(embeddings.dtype)))
                        for f in deepstack]
            images = self._to_sequence_parallel(self._scatter(is_image, image_tokens.to(embeddings.dtype)))
            return torch.where(mask, images, embeddings), features

        @staticmethod
        def _scatter(is_image, tokens):
            """Image tokens ``[n, H]`` laid out over the sequence ``[S, B, H]`` (zeros elsewhere)."""
            dense = tokens.new_zeros(*is_image.shape, tokens.shape[-1])
            dense[is_image] = tokens
            return dense.transpose(0, 1)

        def _to_sequence_parallel(self, tensor):
            if not self.config.sequence_parallel:
                return tensor
            if tensor.dtype == torch.bool:
                rank, size = self.tp_group.rank(), self.tp_group.size()
                return tensor.chunk(size, dim=0)[rank]
            return tensor_parallel.scatter_to_sequence_parallel_region(tensor, group=self.tp_group)

        def _add_deepstack(self, index: int):
            """Adds deepstack feature ``index`` to text layer ``index``'s output. The features are
            the layer's ``context`` (``[features, S(/tp), B, H]``; None without images), an input
            of the layer, so a layer recomputed in backward (full recompute) finds them among its
            checkpointed inputs and their gradient still reaches the tower."""

            def hook(module, inputs, output):
                hidden, context = output
                if context is None:
                    return output
                return hidden + context[index], context

            return hook

    return Qwen3VLModel


def build_model(spec: Qwen3VLSpec, pg_collection, *, use_te: bool = False, pp_rank: int = 0):
    """The model share of this rank: the vision tower on the first stage, the text layers of stage ``pp_rank``."""
    model = _vl_model_class()(spec, pg_collection, use_te=use_te, pp_rank=pp_rank)
    if torch.cuda.is_available() and any(p.device.type == "cpu" for p in model.parameters()):
        model.cuda(torch.cuda.current_device())
    return model


# ----------------------------------------------------------------------------------------------
# Weights


def weight_table(spec: Qwen3VLSpec) -> MappingTable:
    """Every Megatron parameter of the model and the HF tensors it is made of. Experts are named
    one by one (``...experts.{expert}.gate_proj.weight``); the Hub stores them fused per layer,
    which ``convert/hf_layout.py`` translates on reading and writing."""
    vision = spec.vision
    vcfg = vision.config
    qkv = SplitFusedQKV(vcfg.num_attention_heads, vcfg.num_query_groups, vcfg.kv_channels)
    block, hf_block = "vision.blocks.layers.{layer}", "model.visual.blocks.{layer}"
    entries = [
        WeightMap("vision.patch_embed.weight", ("model.visual.patch_embed.proj.weight",),
                  FlattenPatchConv((vision.in_channels, vision.temporal_patch_size, vision.patch_size,
                                    vision.patch_size))),
        WeightMap("vision.patch_embed.bias", ("model.visual.patch_embed.proj.bias",)),
        WeightMap("vision.pos_embed.weight", ("model.visual.pos_embed.weight",)),
    ]
    for kind in ("weight", "bias"):
        entries += [
            # The local spec keeps norms as modules; the TE spec fuses them into the next linear.
            WeightMap(f"{block}.input_layernorm.{kind}", (f"{hf_block}.norm1.{kind}",)),
            WeightMap(f"{block}.self_attention.linear_qkv.layer_norm_{kind}", (f"{hf_block}.norm1.{kind}",)),
            WeightMap(f"{block}.pre_mlp_layernorm.{kind}", (f"{hf_block}.norm2.{kind}",)),
            WeightMap(f"{block}.mlp.linear_fc1.layer_norm_{kind}", (f"{hf_block}.norm2.{kind}",)),
            WeightMap(f"{block}.self_attention.linear_qkv.{kind}", (f"{hf_block}.attn.qkv.{kind}",), qkv, Split(0)),
            WeightMap(f"{block}.mlp.linear_fc1.{kind}", (f"{hf_block}.mlp.linear_fc1.{kind}",), split=Split(0)),
        ]
        for merger, hf_merger in (("vision.merger", "model.visual.merger"),
                                  ("vision.deepstack_mergers.{layer}", "model.visual.deepstack_merger_list.{layer}")):
            entries += [WeightMap(f"{merger}.{part}.{kind}", (f"{hf_merger}.{part}.{kind}",))
                        for part in ("norm", "linear_fc1", "linear_fc2")]
    entries += [
        WeightMap(f"{block}.self_attention.linear_proj.weight", (f"{hf_block}.attn.proj.weight",), split=Split(1)),
        WeightMap(f"{block}.self_attention.linear_proj.bias", (f"{hf_block}.attn.proj.bias",)),
        WeightMap(f"{block}.mlp.linear_fc2.weight", (f"{hf_block}.mlp.linear_fc2.weight",), split=Split(1)),
        WeightMap(f"{block}.mlp.linear_fc2.bias", (f"{hf_block}.mlp.linear_fc2.bias",)),
    ]
    entries += qwen3_moe.text_entries(spec.text, megatron_prefix="language_model.", hf_prefix="model.language_model.")
    return MappingTable(entries)


def _require(hf: dict, key: str, section: str | None = None):
    if key not in hf or hf[key] is None:
        where = f"config.json {section}" if section else "config.json"
        raise ConfigError(f"{where} has no {key!r}, which a Qwen3-VL-MoE model needs")
    return hf[key]


__all__ = ["ARCHITECTURES", "Qwen3VLSpec", "VisionSpec", "build_model", "check_architecture", "from_hf_config",
           "mrope_position_ids", "read_hf_config", "weight_table"]
