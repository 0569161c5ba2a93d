"""Checkpoint conversion between PyTorch/Hugging Face weights and jax-adapter checkpoints.

Key mapping:

- ``convert.keys``: the table between module paths and the seed DinoAdapter's PyTorch names
  and layouts; checking a source against a model; converting tensors one at a time.
- ``convert.formats``: the registry of source formats (one record each: detection, anchors,
  key converter, source names) grouped by family (DINOv2, DINOv3: kinds, config inference,
  data checks, export names); ``convert.formats.dinov3`` holds the DINOv3 formats.
- ``convert.sources``: per-source name converters (DINOv2 hub, Hugging Face) as pure functions.
- ``convert.infer``: the model config implied by tensor shapes, merged with ``--config`` /
  ``--preset``.

File I/O:

- ``convert.reader``: opening a source (file or Hugging Face folder), finding the backbone.
- ``convert.torch_io`` / ``convert.safetensors_io``: ``.pth``/``.bin`` (weights-only, mmap) and
  ``.safetensors`` (the ``safetensors`` package, numpy, no torch) reading and writing;
  ``convert.tensors``: lazy tensor handles.
- ``convert.checkpoint``: checkpoint directories (orbax arrays + ``jax_adapter.json``), atomic.
- ``convert.pipeline``: ``convert_file``, ``export_checkpoint``, ``inspect_path``.
"""
