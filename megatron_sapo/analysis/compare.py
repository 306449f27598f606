"""`megatron-sapo compare RUN_DIR... --out DIR`: training runs side by side.

Reads each run folder (``runs.py``), labels and aggregates seeds (``summary.py``), and writes
``compare.png`` and ``compare.md`` into ``--out`` (``report.py``); the markdown also goes to
stdout. Existing files of those names in ``--out`` are replaced: a comparison is cheap to redo.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from megatron_sapo.analysis.runs import Run, read_run
from megatron_sapo.analysis.summary import Summary, group_by_label, summarize
from megatron_sapo.errors import InputError

PNG_NAME = "compare.png"
MARKDOWN_NAME = "compare.md"
DEFAULT_COLLAPSE_DROP = 0.2
DEFAULT_SMOOTH = 5


@dataclass(frozen=True)
class Comparison:
    """What ``compare_runs`` computed and wrote."""

    by_label: list[Summary]
    """One row per label, seeds averaged, in the order the labels first appear."""
    by_run: list[Summary]
    """One row per run, in the order given."""
    png: Path
    """The figure written."""
    markdown: Path
    """The tables written."""


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
                 collapse_drop: float = DEFAULT_COLLAPSE_DROP, smooth: int = DEFAULT_SMOOTH) -> Comparison:
    """Read ``run_dirs``, write ``compare.png`` and ``compare.md`` into ``out_dir`` (created if needed)."""
    # matplotlib costs most of a second to import: only this command pays it, not every CLI call.
    from megatron_sapo.analysis.report import markdown, plot_comparison, write_png

    if not collapse_drop > 0:
        raise InputError(f"--collapse-drop must be > 0, got {collapse_drop}")
    if smooth < 1:
        raise InputError(f"--smooth must be >= 1, got {smooth}")
    runs = [read_run(path) for path in run_dirs]
    groups = group_by_label(runs, labels)
    by_label = [summarize(label, members, collapse_drop, smooth) for label, members in groups.items()]
    names = _run_names(groups)
    by_run = [summarize(names[id(run)], [run], collapse_drop, smooth) for run in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / PNG_NAME, out_dir / MARKDOWN_NAME
    write_png(plot_comparison(by_label), png)
    md.write_text(markdown(by_label, by_run, collapse_drop, smooth))
    return Comparison(by_label, by_run, png, md)


def _run_names(groups: dict[str, list[Run]]) -> dict[int, str]:
    """Each run's row name (by ``id``): its label, with the seed where several runs share it."""
    return {id(run): f"{label} seed {run.seed}" if len(members) > 1 else label
            for label, members in groups.items() for run in members}


def compare(args: argparse.Namespace) -> int:
    result = compare_runs(args.run_dirs, args.out, args.labels, args.collapse_drop, args.smooth)
    print(result.markdown.read_text())
    print(f"wrote {result.png} and {result.markdown}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="plot and tabulate training runs side by side (reward, Pass@1, collapse)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="training output folder holding config.toml and metrics.jsonl (or TensorBoard events)")
    p.add_argument("--out", required=True, help=f"folder for {PNG_NAME} and {MARKDOWN_NAME} (created if needed)")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one label per RUN_DIR instead of the algorithm's name; runs sharing a label are "
                        "averaged as seeds")
    p.add_argument("--collapse-drop", type=float, default=DEFAULT_COLLAPSE_DROP,
                   help="collapse: the smoothed reward falls this far below its best so far "
                        f"(reward units, default {DEFAULT_COLLAPSE_DROP})")
    p.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH,
                   help=f"steps in the trailing mean used to detect collapse (default {DEFAULT_SMOOTH})")
    p.set_defaults(func=compare)


__all__ = ["Comparison", "compare", "compare_runs", "register"]
