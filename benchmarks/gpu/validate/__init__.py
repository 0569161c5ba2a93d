"""The one-call GPU validation (``python -m benchmarks.gpu.validate``): one module per group of
steps, the runner in ``__main__``."""
