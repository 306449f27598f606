"""The diagnostics a run stores at a histogram step, over 2 data-parallel replicas of unequal
size: exact counts over both, a sample of exactly the budget split in proportion, seeded, and
a file within its size bound."""

import torch
import torch.distributed as dist

from megatron_sapo.algo.diagnostics import GateRecords, replica_quotas
from megatron_sapo.config import LossConfig
from megatron_sapo.run_diagnostics import collect, size_bound, step_file

TOKENS = {0: 300, 1: 900}
SEQUENCES = {0: 10, 1: 50}


def tagged_records(rank: int) -> GateRecords:
    """Records whose ratios and variances name their replica and index (rank * 10,000 + index)."""
    tokens, sequences = TOKENS[rank], SEQUENCES[rank]
    token_tag = rank * 10_000 + torch.arange(tokens, dtype=torch.float32)
    seq_tag = rank * 10_000 + torch.arange(sequences, dtype=torch.float32)
    return GateRecords(
        token_ratio=token_tag, token_advantage_sign=torch.ones(tokens, dtype=torch.int8),
        token_engaged=torch.arange(tokens) % 3 == 0, seq_log_ratio_var=seq_tag, seq_gate_gap=seq_tag,
        seq_gap_bound=seq_tag, seq_tau=torch.ones(sequences), seq_ratio=torch.ones(sequences),
        seq_length=torch.ones(sequences, dtype=torch.int32), seq_advantage_sign=torch.ones(sequences, dtype=torch.int8),
        seq_engaged=torch.arange(sequences) % 2 == 0)


def test_replicas_send_a_bounded_proportional_sample(world, tmp_path_factory):
    rank = dist.get_rank()
    records = tagged_records(rank)
    first = collect(records, LossConfig(), 7, seed=0, tokens=120, sequences=30, group=world)
    again = collect(records, LossConfig(), 7, seed=0, tokens=120, sequences=30, group=world)
    if rank != 0:
        assert first is None and again is None
        return
    assert (first.tokens, first.sequences) == (1200, 60)
    assert first.tokens_engaged == 100 + 300 and first.sequences_engaged == 5 + 25
    assert first.loss["name"] == "sapo" and first.step == 7
    # Exactly the budgets, split 1:3 and 1:5, each replica's entries distinct and its own.
    assert (first.sample.tokens, first.sample.sequences) == (120, 30)
    token_from = (first.sample.token_ratio // 10_000).long()
    assert torch.bincount(token_from, minlength=2).tolist() == replica_quotas(120, [300, 900]) == [30, 90]
    seq_from = (first.sample.seq_log_ratio_var // 10_000).long()
    assert torch.bincount(seq_from, minlength=2).tolist() == [5, 25]
    assert first.sample.token_ratio.unique().numel() == 120
    index = (first.sample.token_ratio % 10_000).long()
    assert torch.equal(first.sample.token_engaged, index % 3 == 0)
    # Seeded by (seed, step, replica): the same sample again.
    assert torch.equal(first.sample.token_ratio, again.sample.token_ratio)
    path = step_file(tmp_path_factory.mktemp("diagnostics_run"), 7)
    first.save(path)
    assert path.stat().st_size <= size_bound(120, 30)


def test_a_budget_above_the_step_keeps_everything(world):
    rank = dist.get_rank()
    step = collect(tagged_records(rank), LossConfig(), 1, seed=0, tokens=5000, sequences=5000, group=world)
    if rank == 0:
        assert (step.sample.tokens, step.sample.sequences) == (1200, 60)
        assert step.sample.token_ratio.tolist() == [r * 10_000 + i for r in (0, 1) for i in range(TOKENS[r])]
