"""Parallelism: vocabulary-parallel log-probs (and, as they land, process groups, launch
environment and Megatron-Core CPU compatibility). Process groups are always passed in."""

from megatron_sapo.parallel.vocab_parallel import vocab_parallel_logprobs

__all__ = ["vocab_parallel_logprobs"]
