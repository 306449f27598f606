"""`megatron-sapo diagnose` and the samples a run stores for it: where the gate engaged (the loss's
own metrics), the split of the sampling budget over replicas, the size bound of a step's file,
the statistics and figures of the command, and its errors."""

from dataclasses import fields

import numpy as np
import pytest
import torch

from megatron_sapo import cli
from megatron_sapo.algo import policy_loss
from megatron_sapo.algo.diagnostics import (
    SEQUENCE_BYTES,
    TOKEN_BYTES,
    GateRecords,
    gate_diagnostics,
    gate_engaged,
    gate_records,
    replica_quotas,
)
from megatron_sapo.analysis.diagnose import diagnose_run, read_steps
from megatron_sapo.config import LoggingConfig, LossConfig
from megatron_sapo.errors import InputError
from megatron_sapo.run_diagnostics import (
    _DTYPES,
    FILE_OVERHEAD_BYTES,
    StepDiagnostics,
    drop_after,
    loss_settings,
    size_bound,
    step_file,
    stored_steps,
)

pytestmark = pytest.mark.unit


def rows(batch: int, length: int, spread: float, seed: int = 0):
    """Log-probs, old log-probs, advantages ``[B]`` and a ragged response mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64)
    new = old + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)
    mask[-1] = False  # a row without response tokens: no sequence
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    advantages[0] = 0.0
    return new, old, advantages, mask


def step_of(records: GateRecords, cfg: LossConfig, step: int, tokens: int, sequences: int, seed: int = 0):
    total, seqs, engaged, seqs_engaged = records.counts().tolist()
    sample = records.sample(tokens, sequences, torch.Generator().manual_seed(seed))
    return StepDiagnostics(step=step, loss=loss_settings(cfg), tokens=total, sequences=seqs, tokens_engaged=engaged,
                           sequences_engaged=seqs_engaged, sample=sample)


@pytest.mark.parametrize("cfg, metric", [
    (LossConfig(name="sapo", tau_pos=1.0, tau_neg=1.05), "attenuated_frac"),
    (LossConfig(name="grpo"), "clip_frac"),
    (LossConfig(name="grpo", dual_clip_c=1.5), "clip_frac"),
    (LossConfig(name="gspo", eps_low=0.05, eps_high=0.05), "clip_frac"),
])
def test_engaged_tokens_are_what_the_loss_counts(cfg, metric):
    new, old, advantages, mask = rows(16, 12, spread=1.0)
    engaged = gate_engaged(new, old, advantages, mask, cfg)
    _, metrics = policy_loss(new, old, advantages, mask, cfg)
    expected = sum(v.item() for k, v in metrics.items() if k.startswith("clip_frac_")) if metric == "clip_frac" \
        else metrics[metric].item()
    assert engaged.sum().item() / mask.sum().item() == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < 1  # the spread engages some tokens and not others
    assert not (engaged & ~mask).any()
    if cfg.name == "gspo":  # one sequence ratio: a row's tokens all agree
        for row in range(mask.shape[0]):
            assert engaged[row][mask[row]].unique().numel() <= 1


def test_engaged_by_hand():
    """Ratios placed on either side of each objective's threshold, with both advantage signs."""
    ratio = torch.tensor([[0.7, 1.1, 1.3, 3.5], [0.7, 1.1, 1.3, 3.5], [2.5, 3.0, 1.0, 1.0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    old = torch.zeros_like(ratio)

    def engaged(**loss):
        return gate_engaged(ratio.log(), old, advantages, mask, LossConfig(**loss)).int().tolist()

    # GRPO, band [0.8, 1.28]: only the side the advantage pushes towards clips; dual clip c = 3 for A < 0.
    assert engaged(name="grpo") == [[0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert engaged(name="grpo", dual_clip_c=3.0) == [[0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 0, 0]]
    # SAPO at tau = 1 (A > 0) and 1.05 (A <= 0): sech^2(tau/2 (r - 1)) < 0.5 past r = 2.763 / 2.679.
    assert engaged(name="sapo") == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0]]
    # GSPO: s_i = geometric mean of a row's ratios (1.37, 1.37, 1.96), band [0.95, 1.05].
    assert engaged(name="gspo", eps_low=0.05, eps_high=0.05) == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]


def test_records_hold_every_token_and_sequence_in_row_order():
    cfg = LossConfig()
    new, old, advantages, mask = rows(6, 9, spread=0.5)
    records = gate_records(new, old, advantages, mask, cfg)
    diag = gate_diagnostics(new, old, advantages, mask, cfg.tau_pos, cfg.tau_neg)
    assert records.tokens == mask.sum() and records.sequences == 5
    assert torch.equal(records.token_ratio, diag.token_ratios)
    assert torch.equal(records.seq_log_ratio_var, diag.log_ratio_var)
    row_of_token = mask.nonzero()[:, 0]
    assert torch.equal(records.token_advantage_sign, torch.sign(advantages)[row_of_token].to(torch.int8))
    assert torch.equal(records.seq_length, mask.sum(-1)[:5].to(torch.int32))
    z = torch.where(mask, new - old, 0.0)
    assert torch.allclose(records.seq_ratio.double(), torch.exp(z.sum(-1) / mask.sum(-1).clamp_min(1))[:5], rtol=1e-6)
    engaged = gate_engaged(new, old, advantages, mask, cfg)
    assert torch.equal(records.seq_engaged, engaged.any(-1)[:5])
    assert records.counts().tolist() == [mask.sum().item(), 5, engaged.sum().item(), engaged.any(-1).sum().item()]
    assert {f.name: getattr(records, f.name).dtype for f in fields(GateRecords)} == _DTYPES
    per_token = sum(t.element_size() for n, t in records.as_dict().items() if n.startswith("token_"))
    per_sequence = sum(t.element_size() for n, t in records.as_dict().items() if n.startswith("seq_"))
    assert (per_token, per_sequence) == (TOKEN_BYTES, SEQUENCE_BYTES)


def test_sample_is_a_seeded_subset_in_order():
    new, old, advantages, mask = rows(40, 30, spread=0.3)
    records = gate_records(new, old, advantages, mask, LossConfig())
    first = records.sample(50, 7, torch.Generator().manual_seed(3))
    again = records.sample(50, 7, torch.Generator().manual_seed(3))
    other = records.sample(50, 7, torch.Generator().manual_seed(4))
    assert (first.tokens, first.sequences) == (50, 7)
    assert all(torch.equal(a, b) for a, b in zip(first.as_dict().values(), again.as_dict().values()))
    assert not torch.equal(first.token_ratio, other.token_ratio)
    # Each sampled token is one of the records', in their order, with its own fields.
    index = [int((records.token_ratio == r).nonzero()[0]) for r in first.token_ratio]
    assert index == sorted(index) and len(set(index)) == 50
    assert torch.equal(first.token_engaged, records.token_engaged[index])
    everything = records.sample(10**6, 10**6, torch.Generator().manual_seed(0))
    assert torch.equal(everything.token_ratio, records.token_ratio) and everything.sequences == records.sequences


@pytest.mark.parametrize("budget, counts, expected", [
    (10, [30, 10], [8, 2]),              # 7.5 / 2.5: the tie goes to the lower replica
    (10, [3, 4], [3, 4]),                # the budget covers everything
    (5, [0, 9, 1], [0, 5, 0]),           # 0 / 4.5 / 0.5: the larger remainder wins
    (7, [100, 100, 100, 100], [2, 2, 2, 1]),
])
def test_replica_quotas(budget, counts, expected):
    quotas = replica_quotas(budget, counts)
    assert quotas == expected
    assert sum(quotas) == min(budget, sum(counts)) and all(q <= c for q, c in zip(quotas, counts))


def test_stored_sample_stays_within_its_size_bound(tmp_path):
    """A step far larger than the default budgets (5,000 sequences, ~150,000 tokens) keeps exactly
    the budgets' worth, and its file stays under the documented bound."""
    logging = LoggingConfig()
    new, old, advantages, mask = rows(5000, 60, spread=0.2)
    cfg = LossConfig()
    records = gate_records(new, old, advantages, mask, cfg)
    assert records.tokens > 2 * logging.diagnostics_tokens and records.sequences > logging.diagnostics_sequences
    diag = step_of(records, cfg, 10, logging.diagnostics_tokens, logging.diagnostics_sequences)
    path = step_file(tmp_path, 10)
    diag.save(path)
    assert path.name == "step_0000000010.pt"
    size = path.stat().st_size
    samples = logging.diagnostics_tokens * TOKEN_BYTES + logging.diagnostics_sequences * SEQUENCE_BYTES
    assert samples < size <= size_bound(logging.diagnostics_tokens, logging.diagnostics_sequences)
    assert size - samples < FILE_OVERHEAD_BYTES / 2  # measured: ~5 KiB of container and settings
    loaded = StepDiagnostics.load(path)
    assert loaded.sample.tokens == logging.diagnostics_tokens
    assert loaded.sample.sequences == logging.diagnostics_sequences
    assert (loaded.tokens, loaded.sequences) == (records.tokens, records.sequences)


def test_a_resumed_run_drops_later_steps(tmp_path):
    records = gate_records(*rows(4, 5, spread=0.1), LossConfig())
    for step in (2, 4, 6):
        step_of(records, LossConfig(), step, 10, 10).save(step_file(tmp_path, step))
    drop_after(tmp_path, 4)
    assert list(stored_steps(tmp_path)) == [2, 4]
    assert not list((tmp_path / "diagnostics").glob("*.partial"))


def stored_run(tmp_path, cfg=None):
    """A run folder with steps 3 and 6 of synthetic rows (larger log-ratios at step 6)."""
    cfg = cfg or LossConfig()
    for step, spread in ((3, 0.3), (6, 0.9)):
        records = gate_records(*rows(80, 25, spread, seed=step), cfg)
        step_of(records, cfg, step, tokens=600, sequences=50, seed=step).save(step_file(tmp_path / "run", step))
    return tmp_path / "run"


def test_statistics_are_those_of_the_stored_files(tmp_path):
    run = stored_run(tmp_path, LossConfig(name="grpo"))
    result = diagnose_run(run, tmp_path / "out")
    assert [s.step for s in result.steps] == [3, 6]
    for summary in result.steps:
        raw = torch.load(step_file(run, summary.step), weights_only=True)
        counts, sample = raw["counts"], {k: v.double().numpy() for k, v in raw["sample"].items()}
        ratio, var = sample["token_ratio"], sample["seq_log_ratio_var"]
        gap, bound = sample["seq_gate_gap"], sample["seq_gap_bound"]
        assert summary.loss == raw["loss"]["name"] == "grpo"
        assert summary.tokens_engaged_frac == counts["tokens_engaged"] / counts["tokens"]
        assert summary.sequences_engaged_frac == counts["sequences_engaged"] / counts["sequences"]
        assert (summary.sampled_tokens, summary.sampled_sequences) == (600, 50)
        expected = {"ratio_mean": ratio.mean(), "ratio_p01": np.quantile(ratio, 0.01),
                    "ratio_p50": np.median(ratio), "ratio_p99": np.quantile(ratio, 0.99), "var_mean": var.mean(),
                    "var_median": np.median(var), "var_max": var.max(), "gap_max": gap.max(),
                    "bound_holds_frac": np.mean(gap <= bound),
                    "gap_over_bound_median": np.median(gap[bound > 0] / bound[bound > 0])}
        for key, value in expected.items():
            assert getattr(summary, key) == pytest.approx(value, rel=1e-9), key
        assert summary.bound_holds_frac == 1.0
    assert result.steps[1].var_mean > result.steps[0].var_mean
    text = result.markdown.read_text()
    assert "clipped: the token ratio left" in text
    step6 = result.steps[1]
    assert f"| 6 | {step6.tokens} | {100 * step6.tokens_engaged_frac:.2f}% |" in text
    for png in (result.ratios_png, result.gate_gap_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_command_line_writes_the_chosen_steps(tmp_path, capsys):
    run = stored_run(tmp_path)
    assert cli.main(["diagnose", str(run), "--step", "6", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Gate engaged (sapo): attenuated" in out and "| 6 |" in out and "| 3 |" not in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"diagnose_ratios.png", "diagnose_gate_gap.png",
                                                               "diagnose.md"}


def test_errors_name_the_folder_step_or_file(tmp_path, capsys):
    def error(*argv):
        assert cli.main(["diagnose", *argv, "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'none'}: no such run folder" in error(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    assert "no diagnostics files (step_*.pt)" in error(str(tmp_path / "empty"))
    run = stored_run(tmp_path)
    assert "--step 5: not stored in" in error(str(run), "--step", "3", "5")
    assert "(stored: 3 6)" in error(str(run), "--step", "5")
    path = step_file(run, 3)
    raw = torch.load(path, weights_only=True)
    raw["sample"]["token_ratio"] = raw["sample"]["token_ratio"].double()
    torch.save(raw, path)
    assert f"{path}: sample 'token_ratio' must be a 1-d torch.float32 tensor" in error(str(run))
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a diagnostics file"):
        read_steps(run)
