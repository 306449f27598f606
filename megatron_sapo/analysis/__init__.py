"""Looking at finished runs: reading run folders, comparing algorithms (``megatron-sapo compare``).

Plain numpy and matplotlib; nothing here imports torch, Megatron or torch.distributed.
"""

from megatron_sapo.analysis.compare import Comparison, compare_runs
from megatron_sapo.analysis.runs import Curve, Run, RunFolderError, read_run
from megatron_sapo.analysis.summary import Summary, default_label

__all__ = ["Comparison", "Curve", "Run", "RunFolderError", "Summary", "compare_runs", "default_label", "read_run"]
