"""Microbatch planning and data-parallel row assignment: pure functions on row lengths, and the
layout of one microbatch (unpacking per-token outputs back to rows)."""

import pytest
import torch

from megatron_sapo.config import ConfigError, TrainConfig
from megatron_sapo.training.microbatch import Batching, build_microbatch, extend_plan, microbatch_cost, plan_rows
from megatron_sapo.training.shard import assign_rows
from megatron_sapo.types import TrainBatch, route_dtype

LENGTHS = [40, 4, 7, 5, 36, 6, 4, 9]


def test_fixed_rows_keep_their_order():
    assert plan_rows(LENGTHS, Batching(micro_batch_size=3), 1) == [[0, 1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.parametrize("pack", [False, True])
def test_a_budget_groups_rows_within_it(pack):
    plan = plan_rows(LENGTHS, Batching(max_tokens=48, pack=pack), 2)
    assert sorted(row for rows in plan for row in rows) == list(range(len(LENGTHS)))
    costs = [microbatch_cost([LENGTHS[i] for i in rows], pack, 2) for rows in plan]
    assert all(cost <= 48 for cost in costs)
    # Longest first: the two long rows never share a microbatch (2 x 40 > 48); packed, the
    # 111 tokens fill the 3 microbatches they need at least.
    assert len(plan) == (3 if pack else 4)
    assert [0] in plan and [4] in plan if not pack else [0, 2] in plan


def test_costs_round_to_the_sequence_parallel_multiple():
    assert microbatch_cost([5, 3], pack=False, multiple=4) == 2 * 8
    assert microbatch_cost([5, 3], pack=True, multiple=4) == 8
    assert microbatch_cost([], pack=True, multiple=4) == 4  # an empty microbatch still runs one slice


def test_a_row_longer_than_the_budget_is_refused_with_both_numbers():
    with pytest.raises(ValueError, match=r"a row of 40 tokens \(40 after rounding .*\) exceeds "
                                         r"train.max_tokens_per_microbatch = 32"):
        plan_rows(LENGTHS, Batching(max_tokens=32), 2)
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch = 1000 is smaller than the longest row, "
                                          "train.max_seq_len = 2048"):
        TrainConfig(max_tokens_per_microbatch=1000, max_seq_len=2048)


def test_extending_a_plan_splits_the_widest_then_adds_empty_microbatches():
    assert extend_plan([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert extend_plan([[0], [1]], 4) == [[0], [1], [], []]


def test_minibatches_hold_the_same_rows_at_any_data_parallel_size():
    for balance in (False, True):
        one = assign_rows(LENGTHS, 2, 1, balance)[0]
        two = assign_rows(LENGTHS, 2, 2, balance)
        for m in range(2):
            assert sorted(two[0][m] + two[1][m]) == one[m] == list(range(4 * m, 4 * m + 4))


def test_balancing_spreads_tokens_over_replicas():
    contiguous = assign_rows(LENGTHS, 1, 2, balance=False)
    balanced = assign_rows(LENGTHS, 1, 2, balance=True)

    def tokens(shares):
        return [sum(LENGTHS[i] for i in share[0]) for share in shares]

    assert tokens(contiguous) == [56, 55]
    assert max(tokens(balanced)) - min(tokens(balanced)) <= max(tokens(contiguous)) - min(tokens(contiguous))
    assert sorted(balanced[0][0] + balanced[1][0]) == list(range(8))
    with pytest.raises(ValueError, match="does not split over 3 data-parallel ranks"):
        assign_rows(LENGTHS, 1, 3, balance=True)


def batch_of(lengths):
    rows, longest = len(lengths), max(lengths)
    tokens = torch.zeros(rows, longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.arange(1, n + 1) + 100 * i
    zeros = torch.zeros(rows, longest)
    routes = [torch.full((n - 1, 2, 2), i, dtype=torch.uint8) for i, n in enumerate(lengths)]
    return TrainBatch(tokens=tokens, targets=tokens, loss_mask=zeros, advantages=zeros[:, 0], rollout_logprobs=zeros,
                      routes=routes, lengths=torch.tensor(lengths))


def test_packed_rows_unpack_to_their_rows():
    batch = batch_of([3, 5, 2])
    micro = build_microbatch(batch, [0, 2], pack=True, multiple=4, with_routes=True)
    assert micro.tokens.tolist() == [[1, 2, 3, 201, 202, 0, 0, 0]]
    assert micro.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert micro.unpack(micro.tokens).tolist() == [[1, 2, 3], [201, 202, 0]]
    # Routes in stream order, -1 at each row's last token and the padding.
    assert micro.routes[0, :, 0, 0].tolist() == [0, 0, -1, 2, -1, -1, -1, -1]
    padded = build_microbatch(batch, [1], pack=False, multiple=4, with_routes=True)
    assert padded.tokens.shape == (1, 8) and padded.unpack(padded.tokens).tolist() == [[101, 102, 103, 104, 105]]


def test_routes_take_the_smallest_type():
    assert route_dtype(128) == torch.uint8 and route_dtype(256) == torch.uint8
    assert route_dtype(257) == torch.int16 and route_dtype(40000) == torch.int32
