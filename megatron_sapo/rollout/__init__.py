"""Rollout on SGLang: server lifecycle, RL client, routed experts, weight sync from Megatron."""
