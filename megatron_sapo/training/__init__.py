"""Megatron-side training pieces: forward passes, (later) minibatch updates and checkpoints."""
