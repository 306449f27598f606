"""Megatron-side training: model/optimizer set-up, forward passes, old log-probs, minibatch
updates (policy loss or supervised), routing replay, the demo's cold start, checkpoints."""
