"""The planner: will a run fit its GPUs, and how long will a step take (``megatron-sapo plan``).

* ``layout.py``: the job's sizes, and each pipeline stage's parameters from the real Megatron
  model built on the meta device inside a fake process group of the job's world size;
* ``activations.py``: what a microbatch saves for backward, item by item, per layer spec;
* ``memory.py``: the peak of a training GPU over the step's moments, by item;
* ``rollout.py``: an SGLang server's weights and KV cache per GPU;
* ``timing.py``: FLOPs and a step-time estimate;
* ``planner.py``: ``plan_run`` putting them together under stated ``Assumptions``;
* ``command.py``: the command, its report, and the check ``train`` and the launcher run;
* ``measure.py``: the measured peak of a real step, which the tests hold the plan to.
"""

from megatron_sapo.plan.layout import Hardware
from megatron_sapo.plan.planner import Assumptions, Plan, plan_run

__all__ = ["Assumptions", "Hardware", "Plan", "plan_run"]
