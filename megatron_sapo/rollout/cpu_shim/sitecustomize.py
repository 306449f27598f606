# Put on PYTHONPATH of SGLang server processes on machines without CUDA (see
# megatron_sapo/rollout/cpu_shims.py); every process SGLang spawns inherits it.
from megatron_sapo.rollout import cpu_shims

cpu_shims.install()
