"""The `megatron-sapo` console script (subcommands are added as features land)."""
