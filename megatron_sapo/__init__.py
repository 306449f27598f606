"""megatron-sapo: SAPO, GRPO, GSPO and routing-replay GRPO for MoE models on Megatron-Core."""

__version__ = "0.1.0"
