"""Checkpoint conversion between unires_jax and PyTorch/transformers."""
