"""The library's own error types.

All derive from :class:`ValueError` (what callers caught before they existed). The command line
turns these, and ``OSError``, into one line on stderr with exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class JaxAdapterError(ValueError):
    """Base class: bad input to the library, described in the message."""


class ConfigError(JaxAdapterError):
    """A model, training or command-line configuration that cannot be used."""


class InputError(JaxAdapterError):
    """Images or arrays of the wrong shape, dtype or size."""


class CheckpointError(JaxAdapterError):
    """A checkpoint directory that is missing, damaged or does not fit its config."""


class ConversionError(JaxAdapterError):
    """A source checkpoint that cannot be converted (format, keys, shapes, hashes)."""


class FetchError(JaxAdapterError):
    """Weights named by a preset, URL or ``hf-hub:`` name that cannot be fetched (offline and not
    cached, a failed or truncated download, an unknown name)."""


class TrainingError(JaxAdapterError):
    """A training run that cannot go on (a non-finite loss)."""


class DependencyError(JaxAdapterError):
    """An optional package a feature needs is not installed (the message names the extra)."""
