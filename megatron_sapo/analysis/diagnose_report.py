"""The diagnosis's outputs: figures in the style of the paper's figures 2 and 3, and a markdown table.

* Ratios (figure 2): left, the histogram of sampled token ratios ``r_it`` on the range holding
  99.8% of them (the rest land in the end bins), log counts; right, the histogram of ``Var_i``
  on logarithmic bins (sequences with ``Var_i = 0``, e.g. one-token answers, are counted in the
  legend, not drawn). One outline per step.
* Gate gap (figure 3): ``D_i`` against ``Var_i`` per sampled sequence, log-log, with the bound
  ``D_i = tau^2/4 Var_i`` for each temperature in the run as a dashed line: every point lies on
  or below its line.

Figures are drawn on a bare ``Figure`` with the Agg canvas, never through pyplot (as
``report.py``), so no global backend state is touched and no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_sapo.algo.diagnostics import histogram
from megatron_sapo.analysis.diagnose import ENGAGED, StepSummary
from megatron_sapo.analysis.report import DPI, write_png
from megatron_sapo.run_diagnostics import StepDiagnostics

FIGURE_SIZE = (12.0, 4.5)  # inches
GAP_FIGURE_SIZE = (6.5, 5.0)
LEGEND_STEPS = 10
"""Up to this many steps get a legend entry and a colour of their own; more share a colour map."""


def _colours(count: int) -> list:
    if count <= LEGEND_STEPS:
        return [f"C{index}" for index in range(count)]
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(index / (count - 1)) for index in range(count)]


def plot_ratios(stored: list[StepDiagnostics], bins: int) -> Figure:
    """Histograms of ``r_it`` (left) and ``Var_i`` (right), one outline per step."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ratio_axes, var_axes = figure.subplots(1, 2)
    ratio_range = _range([_quantiles(diag.sample.token_ratio.double(), 0.001, 0.999) for diag in stored], 1e-3)
    logs = [torch.log10(diag.sample.seq_log_ratio_var.double()) for diag in stored]
    var_range = _range([(part[part.isfinite()].min().item(), part[part.isfinite()].max().item())
                        for part in logs if part.isfinite().any()], 0.5)
    for diag, log_var, colour in zip(stored, logs, _colours(len(stored))):
        label = f"step {diag.step}" if len(stored) <= LEGEND_STEPS else None
        if ratio_range is not None and diag.sample.tokens:
            counts, edges = histogram(diag.sample.token_ratio, bins, *ratio_range)
            ratio_axes.stairs(counts.numpy(), edges.numpy(), color=colour, label=label)
        if var_range is not None and log_var.isfinite().any():
            zeros = int((~log_var.isfinite()).sum())
            counts, edges = histogram(log_var[log_var.isfinite()], bins, *var_range)
            var_label = None if label is None else f"{label} ({zeros} with Var_i = 0)" if zeros else label
            var_axes.stairs(counts.numpy(), (10 ** edges).numpy(), color=colour, label=var_label)
    ratio_axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ratio_axes.set(title="Token ratios r = pi_theta / pi_old (sampled tokens)", xlabel="r", ylabel="tokens",
                   yscale="log")
    var_axes.set(title="Per-sequence log-ratio variance Var_i (sampled sequences)", xlabel="Var_i",
                 ylabel="sequences", xscale="log")
    for axes, empty in ((ratio_axes, ratio_range is None), (var_axes, var_range is None)):
        if empty:
            axes.text(0.5, 0.5, "nothing to show: no sampled values", ha="center", va="center",
                      transform=axes.transAxes)
        elif len(stored) <= LEGEND_STEPS:
            axes.legend(loc="best", fontsize="small")
        axes.grid(alpha=0.3)
    return figure


def _quantiles(values: torch.Tensor, low: float, high: float) -> tuple[float, float] | None:
    return (torch.quantile(values, low).item(), torch.quantile(values, high).item()) if values.numel() else None


def _range(parts: list[tuple[float, float] | None], widen: float) -> tuple[float, float] | None:
    """The range covering every step's ``(low, high)``, widened when it is a single point."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    low, high = min(part[0] for part in parts), max(part[1] for part in parts)
    return (low - widen, high + widen) if high <= low else (low, high)


def plot_gate_gap(stored: list[StepDiagnostics]) -> Figure:
    """``D_i`` against ``Var_i`` per sampled sequence with the bound ``tau^2/4 Var_i``, log-log."""
    figure = Figure(figsize=GAP_FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    hidden = 0
    for diag, colour in zip(stored, _colours(len(stored))):
        var, gap = diag.sample.seq_log_ratio_var, diag.sample.seq_gate_gap
        shown = (var > 0) & (gap > 0)
        hidden += int((~shown).sum())
        axes.scatter(var[shown].numpy(), gap[shown].numpy(), s=6, alpha=0.6, color=colour, linewidths=0,
                     label=f"step {diag.step}" if len(stored) <= LEGEND_STEPS else None)
    variances = torch.cat([diag.sample.seq_log_ratio_var for diag in stored])
    positive = variances[variances > 0].double()
    if positive.numel():
        line = torch.logspace(torch.log10(positive.min()).item(), torch.log10(positive.max()).item(), 50,
                              dtype=torch.float64)
        taus = sorted({round(t, 6) for diag in stored for t in diag.sample.seq_tau.tolist()})
        for index, tau in enumerate(taus):
            axes.plot(line.numpy(), (tau ** 2 / 4 * line).numpy(), color="black", linewidth=1,
                      linestyle=("--", ":", "-.")[index % 3], label=f"bound tau^2/4 Var_i, tau = {tau:g}")
        axes.set(xscale="log", yscale="log")
    else:
        axes.text(0.5, 0.5, "nothing to show: every sampled Var_i is 0", ha="center", va="center",
                  transform=axes.transAxes)
    note = f" ({hidden} with Var_i or D_i = 0 not drawn)" if hidden else ""
    axes.set(title=f"Gate gap D_i against Var_i{note}", xlabel="Var_i", ylabel="D_i")
    axes.legend(loc="best", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def markdown(run_dir: Path, stored: list[StepDiagnostics], summaries: list[StepSummary]) -> str:
    """Per step: exact engaged fractions, then statistics of the sample; what "engaged" means."""
    losses = sorted({s.loss for s in summaries})
    header = ["step", "tokens", "tokens engaged", "sequences", "sequences engaged", "sampled tokens",
              "sampled sequences", "r mean", "r p1", "r p50", "r p99", "Var_i mean", "Var_i median", "Var_i max",
              "D_i max", "D_i <= bound", "median D_i / bound"]
    rows = [[str(s.step), str(s.tokens), _percent(s.tokens_engaged_frac), str(s.sequences),
             _percent(s.sequences_engaged_frac), str(s.sampled_tokens), str(s.sampled_sequences),
             _number(s.ratio_mean), _number(s.ratio_p01), _number(s.ratio_p50), _number(s.ratio_p99),
             _number(s.var_mean), _number(s.var_median), _number(s.var_max), _number(s.gap_max),
             "n/a" if s.bound_holds_frac is None else _percent(s.bound_holds_frac), _number(s.gap_over_bound_median)]
             for s in summaries]
    settings = stored[-1].loss
    lines = [
        "# Gate diagnostics",
        "",
        f"Run `{run_dir}`, objective {', '.join(losses)} (tau_pos {settings['tau_pos']:g}, tau_neg "
        f"{settings['tau_neg']:g}" + (f", eps_low {settings['eps_low']:g}, eps_high {settings['eps_high']:g}"
                                      if settings["eps_low"] is not None else "") + ").",
        "",
        *(f"Gate engaged ({name}): {ENGAGED[name]}. A sequence is engaged when any of its tokens is."
          for name in losses),
        "",
        "Tokens, sequences and the engaged fractions count every response token of the step (exact). The "
        "other columns describe the stored uniform samples: token ratios r after the step's updates against "
        "the old policy the updates started from, Var_i the variance of a sequence's token log-ratios, D_i "
        "the gap between its mean token gate and its sequence gate, bounded by tau^2/4 Var_i (paper eq. 21; "
        "D_i and the bound use SAPO's temperatures whatever the objective).",
        "",
        *_table(header, rows),
        "",
    ]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


__all__ = ["markdown", "plot_gate_gap", "plot_ratios", "write_png"]
