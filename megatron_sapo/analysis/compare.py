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
DEFAULT_COLLAPSE_HOLD = 5
DEFAULT_ENTROPY_FRAC = 0.1


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
                 collapse_drop: float = DEFAULT_COLLAPSE_DROP, smooth: int = DEFAULT_SMOOTH,
                 hold: int = DEFAULT_COLLAPSE_HOLD, entropy_frac: float = DEFAULT_ENTROPY_FRAC) -> Comparison:
    """Read ``run_dirs``, write ``compare.png`` and ``compare.md`` into ``out_dir`` (created if needed)."""
    # matplotlib costs most of a second to import: only this command pays it, not every CLI call.
    from megatron_sapo.analysis.report import markdown, plot_comparison, write_png

    if not collapse_drop > 0:
        raise InputError(f"--collapse-drop must be > 0, got {collapse_drop}")
    if smooth < 1:
        raise InputError(f"--smooth must be >= 1, got {smooth}")
    if hold < 1:
        raise InputError(f"--collapse-hold must be >= 1, got {hold}")
    if not 0 < entropy_frac < 1:
        raise InputError(f"--entropy-frac must be in (0, 1), got {entropy_frac}")
    runs = [read_run(path) for path in run_dirs]
    groups = group_by_label(runs, labels)
    rule = dict(collapse_drop=collapse_drop, smooth=smooth, hold=hold, entropy_frac=entropy_frac)
    by_label = [summarize(label, members, **rule) for label, members in groups.items()]
    names = _run_names(groups)
    by_run = [summarize(names[id(run)], [run], **rule) for run in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / PNG_NAME, out_dir / MARKDOWN_NAME
    write_png(plot_comparison(by_label), png)
    md.write_text(markdown(by_label, by_run, **rule))
    return Comparison(by_label, by_run, png, md)


def _run_names(groups: dict[str, list[Run]]) -> dict[int, str]:
    """Each run's row name (by ``id``): its label, with the seed where several runs share it."""
    return {id(run): f"{label} seed {run.seed}" if len(members) > 1 else label
            for label, members in groups.items() for run in members}


def compare(args: argparse.Namespace) -> int:
    result = compare_runs(args.run_dirs, args.out, args.labels, args.collapse_drop, args.smooth, args.collapse_hold,
                          args.entropy_frac)
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
                   help="reward collapse: the smoothed reward falls this far below its best so far and never "
                        f"comes back within it (reward units, default {DEFAULT_COLLAPSE_DROP})")
    p.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH,
                   help=f"steps in the trailing mean used to detect collapse (default {DEFAULT_SMOOTH})")
    p.add_argument("--collapse-hold", type=int, default=DEFAULT_COLLAPSE_HOLD,
                   help="a collapse must last at least this many logged steps to the end of the run "
                        f"(default {DEFAULT_COLLAPSE_HOLD})")
    p.add_argument("--entropy-frac", type=float, default=DEFAULT_ENTROPY_FRAC,
                   help="entropy collapse: the smoothed entropy falls below this fraction of its early value "
                        f"and stays there (default {DEFAULT_ENTROPY_FRAC})")
    p.set_defaults(func=compare)


__all__ = ["Comparison", "compare", "compare_runs", "register"]
