"""Files on disk, safely: JSON objects read with one clear error, writes that appear whole or
not at all, and a lock that several processes sharing a cache take around one entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, Type

from jax_adapter.errors import CheckpointError, JaxAdapterError


def read_json(path: str, error: Type[JaxAdapterError] = JaxAdapterError) -> Dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file if it cannot be read, is not JSON
    or is not an object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuse an existing ``dst`` unless ``overwrite``, and a missing parent directory."""
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_path(dst: str, *, overwrite: bool, directory: bool) -> Iterator[str]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on error it is
    removed and ``dst`` is left as it was."""
    check_destination(dst, overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".jax_adapter-", dir=parent)
    target = tmp if directory else os.path.join(tmp, os.path.basename(dst))
    try:
        yield target
        if not os.path.lexists(dst):
            os.replace(target, dst)
        else:
            # os.replace cannot replace a non-empty directory: move the old one aside first,
            # and back if the final rename fails.
            old = tempfile.mkdtemp(prefix=".jax_adapter-old-", dir=parent)
            aside = os.path.join(old, "previous")
            os.replace(dst, aside)
            try:
                os.replace(target, dst)
            except BaseException:
                os.replace(aside, dst)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(dst: str, writer: Callable[[str], None], *, overwrite: bool) -> None:
    """Run ``writer(tmp_path)`` and move the result to ``dst`` only if it succeeded."""
    with atomic_path(dst, overwrite=overwrite, directory=False) as tmp:
        writer(tmp)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) across processes, held for the block.

    ``flock`` on POSIX, ``msvcrt.locking`` on Windows: the operating system releases it when its
    holder dies, so a killed process never leaves a cache locked.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # Windows
    import msvcrt
    import time

    def _lock(fd: int) -> None:
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                time.sleep(0.1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
