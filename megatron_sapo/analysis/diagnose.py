"""`megatron-sapo diagnose RUN_DIR [--step N ...] --out DIR`: the paper's figures 2-3 for a run.

Reads the files a run stores at its histogram steps (``RUN_DIR/diagnostics/``, see
``run_diagnostics.py``) and writes into ``--out``:

* ``diagnose_ratios.png``: histograms of the token ratios ``r_it`` and of the per-sequence
  log-ratio variance ``Var_i`` (figure 2), one outline per step;
* ``diagnose_gate_gap.png``: ``D_i`` against ``Var_i`` per sequence with the bound
  ``tau^2/4 Var_i`` (figure 3);
* ``diagnose.md`` (also printed): per step, the exact fractions of tokens and sequences where
  the gate engaged, and statistics of the stored samples.

Fractions are exact (the run counts every token); histograms, the scatter and the other
statistics describe the uniform samples the run stored. Existing files of those names in
``--out`` are replaced.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sapo.algo.gates import ATTENUATED_BELOW
from megatron_sapo.errors import InputError
from megatron_sapo.run_diagnostics import FOLDER, StepDiagnostics, stored_steps

RATIOS_PNG = "diagnose_ratios.png"
GATE_GAP_PNG = "diagnose_gate_gap.png"
MARKDOWN_NAME = "diagnose.md"
DEFAULT_BINS = 60

ENGAGED: dict[str, str] = {
    "sapo": "attenuated: the soft gate's gradient weight sech^2(tau/2 (r - 1)) is below "
            f"{ATTENUATED_BELOW:g} (the `attenuated_frac` metric)",
    "grpo": "clipped: the token ratio left [1 - eps_low, 1 + eps_high] on the side its advantage pushes "
            "towards (or passed the dual clip c for A < 0), so the clip removed its gradient (the `clip_frac` metric)",
    "gspo": "clipped: the sequence ratio s_i left [1 - eps_low, 1 + eps_high] on the side its advantage "
            "pushes towards, for every token of the sequence (the `clip_frac` metric)",
}
"""What "the gate engaged" means for each objective. A sequence is engaged when any of its tokens is."""


@dataclass(frozen=True)
class StepSummary:
    """One step's statistics. Fractions of engaged tokens and sequences are exact; the rest are
    over the stored sample (None where the sample has nothing to measure)."""

    step: int
    loss: str
    tokens: int
    sequences: int
    tokens_engaged_frac: float
    sequences_engaged_frac: float
    sampled_tokens: int
    sampled_sequences: int
    ratio_mean: float | None
    ratio_p01: float | None
    ratio_p50: float | None
    ratio_p99: float | None
    var_mean: float | None
    var_median: float | None
    var_max: float | None
    gap_max: float | None
    bound_holds_frac: float | None
    """Fraction of sampled sequences with ``D_i <= tau_i^2/4 Var_i``."""
    gap_over_bound_median: float | None
    """Median of ``D_i / bound`` over sampled sequences with a positive bound: how tight it is."""


@dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose_run`` computed and wrote."""

    steps: list[StepSummary]
    ratios_png: Path
    gate_gap_png: Path
    markdown: Path


def summarize_step(diag: StepDiagnostics) -> StepSummary:
    """The statistics of one stored step (float64 throughout; quantiles by linear interpolation)."""
    sample = diag.sample
    ratio = sample.token_ratio.double()
    var, gap, bound = (sample.seq_log_ratio_var.double(), sample.seq_gate_gap.double(),
                       sample.seq_gap_bound.double())
    tight = bound > 0
    return StepSummary(
        step=diag.step, loss=str(diag.loss["name"]), tokens=diag.tokens, sequences=diag.sequences,
        tokens_engaged_frac=diag.tokens_engaged / max(diag.tokens, 1),
        sequences_engaged_frac=diag.sequences_engaged / max(diag.sequences, 1),
        sampled_tokens=ratio.numel(), sampled_sequences=var.numel(),
        ratio_mean=_stat(ratio, torch.mean), ratio_p01=_quantile(ratio, 0.01), ratio_p50=_quantile(ratio, 0.5),
        ratio_p99=_quantile(ratio, 0.99), var_mean=_stat(var, torch.mean), var_median=_quantile(var, 0.5),
        var_max=_stat(var, torch.max), gap_max=_stat(gap, torch.max),
        bound_holds_frac=_stat((gap <= bound).double(), torch.mean),
        gap_over_bound_median=_quantile(gap[tight] / bound[tight], 0.5))


def _stat(values: torch.Tensor, fn) -> float | None:
    return fn(values).item() if values.numel() else None


def _quantile(values: torch.Tensor, q: float) -> float | None:
    return torch.quantile(values, q).item() if values.numel() else None


def read_steps(run_dir: str | Path, steps: list[int] | None = None) -> list[StepDiagnostics]:
    """The stored steps of ``run_dir`` (all, or ``steps`` in increasing order)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    stored = stored_steps(run_dir)
    if not stored:
        raise FileNotFoundError(f"{run_dir / FOLDER}: no diagnostics files (step_*.pt); a run writes them "
                                "every logging.histogram_every steps")
    if steps is not None:
        missing = sorted(set(steps) - set(stored))
        if missing:
            raise InputError(f"--step {' '.join(map(str, missing))}: not stored in {run_dir / FOLDER} "
                             f"(stored: {' '.join(map(str, stored))})")
        stored = {step: stored[step] for step in sorted(set(steps))}
    return [StepDiagnostics.load(path) for path in stored.values()]


def diagnose_run(run_dir: str | Path, out_dir: str | Path, steps: list[int] | None = None,
                 bins: int = DEFAULT_BINS) -> Diagnosis:
    """Read ``run_dir``'s diagnostics (all steps, or ``steps``), write the two figures and the
    markdown into ``out_dir`` (created if needed)."""
    # matplotlib costs most of a second to import: only this command pays it, not every CLI call.
    from megatron_sapo.analysis.diagnose_report import markdown, plot_gate_gap, plot_ratios, write_png

    if bins < 1:
        raise InputError(f"--bins must be >= 1, got {bins}")
    stored = read_steps(run_dir, steps)
    summaries = [summarize_step(diag) for diag in stored]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratios, gate_gap, md = out_dir / RATIOS_PNG, out_dir / GATE_GAP_PNG, out_dir / MARKDOWN_NAME
    write_png(plot_ratios(stored, bins), ratios)
    write_png(plot_gate_gap(stored), gate_gap)
    md.write_text(markdown(Path(run_dir), stored, summaries))
    return Diagnosis(summaries, ratios, gate_gap, md)


def diagnose(args: argparse.Namespace) -> int:
    result = diagnose_run(args.run_dir, args.out, args.steps, args.bins)
    print(result.markdown.read_text())
    print(f"wrote {result.ratios_png}, {result.gate_gap_png} and {result.markdown}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="the paper's figures 2-3 for a run: token ratios, Var_i, D_i against its "
                                        "bound, and where the gate engaged")
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"training output folder holding {FOLDER}/step_*.pt")
    p.add_argument("--step", dest="steps", type=int, nargs="+", metavar="N",
                   help="the histogram steps to show (default: every stored step)")
    p.add_argument("--out", required=True,
                   help=f"folder for {RATIOS_PNG}, {GATE_GAP_PNG} and {MARKDOWN_NAME} (created if needed)")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help=f"histogram bins (default {DEFAULT_BINS})")
    p.set_defaults(func=diagnose)


__all__ = ["Diagnosis", "StepSummary", "diagnose", "diagnose_run", "read_steps", "register", "summarize_step"]
