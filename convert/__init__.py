"""Checkpoint conversion between PyTorch state dicts and jax-adapter checkpoints.

``convert.keys`` maps parameter names and layouts; ``convert.torch_io`` reads PyTorch files;
``convert.checkpoint`` writes and reads checkpoint directories.
"""
