"""Progress bars on stderr (``tqdm``), drawn only on a terminal.

One function for every long-running command: conversion, export, downloads and ``jax-adapter
train``. ``tqdm`` is also what ``huggingface_hub`` draws its download bars with, so a download
through it looks like the rest. Where the stream is not a terminal (a pipe, a log file, a test),
the bar is a silent no-op with the same methods.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

from tqdm import tqdm

# Below this many bytes, work on weights ends in well under a second: no bar.
MIN_BYTES = 256 << 20


def progress_bar(
    total: Optional[int], label: str, *, unit: str = "B", initial: int = 0,
    stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
) -> tqdm:
    """A bar for ``total`` units of work: ``with progress_bar(n, "converting") as bar: bar.update(k)``.

    ``unit="B"`` counts bytes (shown in KiB/MiB/GiB) and draws only from :data:`MIN_BYTES`;
    other units (``"step"``) always draw. ``total=None`` (a download of unknown size) draws a
    counter instead of a bar. Drawn on ``stream`` (default stderr) only when it is a terminal;
    ``enabled`` forces either way. ``initial``: units already done (a resumed run).
    """
    stream = sys.stderr if stream is None else stream
    in_bytes = unit == "B"
    if enabled is None:
        isatty = getattr(stream, "isatty", None)
        enabled = bool(isatty is not None and isatty()) and (not in_bytes or total is None
                                                             or total >= MIN_BYTES)
    # Follow the terminal's size; tqdm hides the bar of a terminal that reports none (a
    # pseudo-terminal without a size): give it 80x24.
    sized = _columns(stream) > 0
    return tqdm(
        total=total, initial=initial, desc=f"{label:<10}", unit=unit, unit_scale=in_bytes,
        unit_divisor=1024 if in_bytes else 1000, file=stream, disable=not enabled, leave=True,
        dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24,
    )


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
        return 0
