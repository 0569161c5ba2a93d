"""jax-adapter: the DinoAdapter (ViT-Adapter around DINOv2) in JAX / Flax NNX."""
