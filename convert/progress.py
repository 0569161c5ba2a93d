"""A minimal progress bar on stderr, shown only on a terminal and for work that takes a while."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

# Below this many bytes a conversion takes well under a second: no bar.
MIN_BYTES = 256 << 20


class Progress:
    """``with Progress(total_bytes, "converting") as bar: bar.update(n)``.

    Draws ``label  42% |########            | 1.9/4.5 GB  3.1s`` on one line, redrawn at most ten
    times a second, when ``stream`` is a TTY and ``total`` is at least :data:`MIN_BYTES`
    (``enabled`` forces either way).
    """

    def __init__(self, total: int, label: str, *, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None, width: int = 30):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", lambda: False)
            enabled = bool(isatty()) and total >= MIN_BYTES
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * self.width)
        gb = 1 << 30
        self.stream.write(
            f"\r{self.label} {frac:4.0%} |{bar:<{self.width}}| "
            f"{self.done / gb:.1f}/{self.total / gb:.1f} GB {now - self.start:5.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
