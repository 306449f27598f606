"""Format transforms and parallel splits: exact inverses, and the layouts Megatron uses."""

import pytest
import torch

from megatron_sapo.convert.sharding import Split, SplitGLU
from megatron_sapo.convert.transforms import FuseGLU, FuseQKV, PadVocab

pytestmark = pytest.mark.unit


def test_fuse_qkv_groups_heads_by_kv_head_and_inverts():
    heads, groups, dim, hidden = 4, 2, 3, 5
    q = torch.arange(heads * dim * hidden, dtype=torch.float32).reshape(heads * dim, hidden)
    k = -torch.arange(groups * dim * hidden, dtype=torch.float32).reshape(groups * dim, hidden) - 1
    v = k - 1000
    fused = FuseQKV(heads, groups, dim).to_megatron((q, k, v))
    # group 0: q heads 0-1, k head 0, v head 0; then group 1.
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(FuseQKV(heads, groups, dim).to_hf(fused), (q, k, v)))


def test_tp_split_of_fused_qkv_gives_whole_groups():
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)  # 4 heads, 2 groups, dim 2
    fused = FuseQKV(4, 2, 2).to_megatron((q, k, v))
    rank1 = Split(0).shard(fused, 1, 2)
    assert torch.equal(rank1, torch.cat([q[4:8], k[2:4], v[2:4]]))


def test_glu_split_keeps_gate_and_up_halves_per_rank():
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    fused = FuseGLU().to_megatron((gate, up))
    shards = [SplitGLU(0).shard(fused, r, 3) for r in range(3)]
    assert torch.equal(shards[1], torch.cat([gate[2:4], up[2:4]]))
    assert torch.equal(SplitGLU(0).unshard(shards), fused)
    assert all(torch.equal(a, b) for a, b in zip(FuseGLU().to_hf(fused), (gate, up)))


def test_vocab_padding_round_trip_and_check():
    emb = torch.randn(301, 4)
    padded = PadVocab(301, 384).to_megatron((emb,))
    assert padded.shape == (384, 4) and torch.all(padded[301:] == 0)
    assert torch.equal(PadVocab(301, 384).to_hf(padded)[0], emb)
    with pytest.raises(ValueError, match="vocabulary dimension is 300"):
        PadVocab(301, 384).to_megatron((emb[:300],))


def test_split_rejects_uneven_sizes():
    with pytest.raises(ValueError, match="does not split into 2"):
        Split(1).shard(torch.randn(4, 5), 0, 2)
