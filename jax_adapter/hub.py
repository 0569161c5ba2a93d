"""Weights by name: registered weights, ``http(s)://`` URLs and ``hf-hub:ORG/NAME[@REVISION]``
resolved to local files, through a download cache.

- **Registered weights** (:mod:`jax_adapter.registry`: ``dinov2_vitb14.lvd142m``, or an
  architecture with weights such as ``dinov2_vitb14``) stand for their official URL; gated ones
  (DINOv3) have none, and the error says how to get them.
- A **URL** of a ``.pth`` / ``.safetensors`` file is downloaded with the standard library's
  ``urllib`` (redirects, proxies from the environment, TLS; no dependency to add for one GET).
  Signed URLs (DINOv3 weights are gated) work as given; the query string is not part of the cache
  entry's identity, so a fresh signature finds the same entry.
- ``hf-hub:ORG/NAME[@REVISION]`` is a Hugging Face model repository, fetched by the optional
  ``huggingface_hub`` into its own cache (``HF_HUB_CACHE``), which it shares with ``transformers``.

Downloads go to ``$JAX_ADAPTER_CACHE/downloads/`` (default ``~/.cache/jax-adapter``), are written
to a temporary file that is renamed into place only once complete and verified, so an
interrupted download leaves nothing in the cache. Processes sharing the cache download an entry
once: the download runs under a file lock (``locks/``), and the others wait and then find it. A file name carrying a sha256 prefix
(``...-eadcf0ff.pth``, the torch hub and DINOv3 convention) is checked against it.

Offline (``HF_HUB_OFFLINE=1``, or no network) a cached entry is used as it is and a missing one
is a :class:`~jax_adapter.errors.FetchError` naming what to fetch and where to put it.

This module resolves names to files only; turning them into checkpoints (conversion, the
converted-checkpoint cache) is :mod:`jax_adapter.pretrained`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, TextIO

from jax_adapter import registry
from jax_adapter.errors import ConversionError, FetchError
from jax_adapter.files import file_lock

HF_PREFIX = "hf-hub:"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin|safetensors)$")
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A name resolved to local weights.

    ``path``: a weights file or a Hugging Face model folder; ``identity``: what the content is
    (``sha256:<hex>`` of a file, ``hf:<repo>@<commit>`` of a snapshot), the key of converted
    copies; ``origin``: the name as given (a URL without its query string); ``preset``: the
    config preset that goes with the weights, if any.
    """

    path: str
    identity: str
    origin: str
    preset: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Names


def is_remote(name: str) -> bool:
    """Whether ``name`` is a preset name, URL or ``hf-hub:`` name rather than a local path.

    An existing local path always wins, so a folder called ``dinov2_vits14`` is read as a folder.
    """
    if os.path.exists(name):
        return False
    return _registered(name) is not None or name.startswith(HF_PREFIX) or _is_url(name)


def _registered(name: str) -> Optional[registry.Weights]:
    """The weights ``name`` stands for: registered weights, or an architecture's default ones."""
    if registry.is_weights(name):
        return registry.weights(name)
    if registry.is_architecture(name):
        available = registry.weights_of(name)
        return available[0] if available else None
    return None


def _is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def hash_prefix(filename: str) -> Optional[str]:
    """The sha256 prefix a weights file name carries (``name-<hex>.pth``), or ``None``.

    ``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth`` -> ``"eadcf0ff"``; names without a hash
    (``dinov2_vits14_pretrain.pth``) give ``None``.
    """
    m = _HASH_IN_NAME.search(os.path.basename(filename))
    return m.group(1) if m else None


def check_hash_prefix(filename: str, sha256_hex: str) -> None:
    """Raise ``ConversionError`` if ``filename`` carries a sha256 prefix that ``sha256_hex`` (the
    content's digest) does not start with."""
    prefix = hash_prefix(filename)
    if prefix is not None and not sha256_hex.startswith(prefix):
        raise ConversionError(
            f"{os.path.basename(filename)}: the name says sha256 {prefix}..., the file's is "
            f"{sha256_hex[:len(prefix)]}... (corrupt or mislabelled download)")


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> str:
    """``$JAX_ADAPTER_CACHE``, else ``$XDG_CACHE_HOME/jax-adapter``, else ``~/.cache/jax-adapter``."""
    if os.environ.get("JAX_ADAPTER_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["JAX_ADAPTER_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax-adapter")


def lock_path(*entry: str) -> str:
    """The lock file of a cache entry (``("downloads", digest)``, ``("checkpoints", key)``)."""
    return os.path.join(cache_dir(), "locks", "-".join(entry) + ".lock")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: use cached entries only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _strip_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def url_cache_path(url: str) -> str:
    """Where the download of ``url`` is cached: ``downloads/<url digest>/<file name>``.

    The digest is of the URL without its query string (signed URLs change, the file does not).
    """
    plain = _strip_query(url)
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(plain).path))
    if not name.endswith(WEIGHT_SUFFIXES):
        raise FetchError(f"{plain}: expected a URL of a {' / '.join(WEIGHT_SUFFIXES)} file")
    digest = hashlib.sha256(plain.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "downloads", digest, name)


def _sidecar(path: str) -> str:
    return path + ".json"


def _cached_identity(path: str) -> Optional[str]:
    """``sha256:<hex>`` of a cached download, from its record (written after the file); a file
    placed by hand has no record yet: it is hashed, checked and recorded once."""
    if not os.path.isfile(path):
        return None
    try:
        with open(_sidecar(path)) as f:
            record = json.load(f)
        if record.get("bytes") == os.path.getsize(path) and isinstance(record.get("sha256"), str):
            return "sha256:" + record["sha256"]
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    check_hash_prefix(path, digest)
    _write_record(path, {"sha256": digest, "bytes": os.path.getsize(path)})
    return "sha256:" + digest


def _write_record(path: str, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".record-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, _sidecar(path))
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Downloads


def download(url: str, dst: str, *, timeout: float = 60.0, stream: Optional[TextIO] = None,
             show_progress: Optional[bool] = None) -> str:
    """Download ``url`` to ``dst`` atomically; returns the content's sha256 hex digest.

    The bytes go to a temporary file beside ``dst``, hashed on the way; ``dst`` appears only if
    the transfer is complete (``Content-Length`` bytes when the server sends it) and the digest
    matches a hash prefix in the file name. Any failure removes the temporary file and raises
    :class:`FetchError` (or ``ConversionError`` for a hash mismatch). A progress bar is drawn on
    ``stream`` (default stderr) when it is a terminal (``show_progress`` forces either way).
    """
    from jax_adapter.progress import progress_bar

    shown = _strip_query(url)
    folder = os.path.dirname(os.path.abspath(dst))
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    stream = sys.stderr if stream is None else stream
    if show_progress is None:
        isatty = getattr(stream, "isatty", None)
        show_progress = bool(isatty is not None and isatty())
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "jax-adapter"})
        h = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # Unknown size (no Content-Length): a byte counter instead of a bar.
            with progress_bar(total, "downloading", stream=stream, enabled=show_progress) as bar:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise FetchError(f"{shown}: download incomplete ({done} of {total} bytes)")
        digest = h.hexdigest()
        check_hash_prefix(dst, digest)
        os.replace(tmp, dst)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        _discard(tmp, folder if created else None)
        if isinstance(e, (FetchError, ConversionError)):
            raise
        if isinstance(e, urllib.error.HTTPError):
            hint = " (a signed URL may have expired)" if e.code in (401, 403) else ""
            raise FetchError(f"{shown}: HTTP {e.code} {e.reason}{hint}") from None
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"{shown}: download failed ({type(e).__name__}: {reason})") from None
    except BaseException:
        _discard(tmp, folder if created else None)
        raise
    return digest


def _discard(tmp: str, folder: Optional[str]) -> None:
    """Remove a failed download's temporary file, and the entry's folder if this call made it."""
    _remove(tmp)
    if folder is not None:
        try:
            os.rmdir(folder)
        except OSError:  # not empty: another download shares it
            pass


def fetch_url(url: str, *, stream: Optional[TextIO] = None, show_progress: Optional[bool] = None,
              preset: Optional[str] = None, origin: Optional[str] = None) -> Fetched:
    """The cached download of ``url``, downloading it first if needed (not when offline)."""
    path = url_cache_path(url)
    origin = origin or _strip_query(url)
    identity = _cached_identity(path)
    if identity is None:
        if offline():
            raise FetchError(
                f"{origin}: not in the cache and HF_HUB_OFFLINE is set; download it with network "
                f"access (unset HF_HUB_OFFLINE), or fetch {_strip_query(url)} yourself and put it at {path}")
        # One download per entry across processes: whoever gets the lock first downloads, the
        # others find the finished entry when they get it.
        with file_lock(lock_path("downloads", os.path.basename(os.path.dirname(path)))):
            identity = _cached_identity(path)
            if identity is None:
                digest = download(url, path, stream=stream, show_progress=show_progress)
                _write_record(path, {"sha256": digest, "bytes": os.path.getsize(path),
                                     "url": _strip_query(url)})
                identity = "sha256:" + digest
    return Fetched(path=path, identity=identity, origin=origin, preset=preset)


def _hf_cache() -> Optional[str]:
    # Read at call time: huggingface_hub reads its environment once, when first imported.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def parse_hf_name(name: str):
    """``hf-hub:ORG/NAME[@REVISION]`` -> ``(repo_id, revision)`` (revision ``None``: main)."""
    spec = name[len(HF_PREFIX):]
    repo, _, revision = spec.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (revision == "" and "@" in spec):
        raise FetchError(f"{name}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


# Weight files of a model repository, in order of preference (the converter's reading order).
_HF_PATTERNS = (
    ["config.json", "*.safetensors", "*.safetensors.index.json"],
    ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"],
    ["config.json", "*.pth"],
)


def fetch_hf(name: str) -> Fetched:
    """A Hugging Face model repository's snapshot (config and one format of weights)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise FetchError(f"{name}: hf-hub: names need huggingface_hub "
                         "(pip install 'jax-adapter[hub]')") from None
    repo, revision = parse_hf_name(name)
    local_only = offline()
    folder = None
    try:
        for patterns in _HF_PATTERNS:
            folder = snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                       cache_dir=_hf_cache(), local_files_only=local_only)
            if _weights_in(folder):
                break
    except LocalEntryNotFoundError:
        where = _hf_cache() or "the Hugging Face cache"
        why = "HF_HUB_OFFLINE is set" if local_only else "the Hub cannot be reached"
        raise FetchError(
            f"{name}: not in {where} and {why}; fetch it with network access, e.g. "
            f"`hf download {repo}{' --revision ' + revision if revision else ''}`") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise FetchError(f"{name}: {type(e).__name__} ({' '.join(str(e).split())[:200]})") from None
    except HfHubHTTPError as e:
        raise FetchError(f"{name}: {' '.join(str(e).split())[:200]}") from None
    weights = _weights_in(folder)
    if not weights:
        raise FetchError(f"{name}: the snapshot holds no weights (.safetensors, pytorch_model.bin or .pth)")
    commit = os.path.basename(os.path.normpath(folder))
    # A repository with a model folder's files is read as a folder; a lone .pth as that file.
    path = folder if not weights[0].endswith(".pth") else os.path.join(folder, weights[0])
    return Fetched(path=path, identity=f"hf:{repo}@{commit}", origin=name)


def _weights_in(folder: str):
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n.endswith((".safetensors", ".bin", ".pth"))]


def fetch(name: str, *, stream: Optional[TextIO] = None, show_progress: Optional[bool] = None) -> Fetched:
    """Resolve registered weights, a URL or an ``hf-hub:`` name to local weights, fetching them
    if needed. ``Fetched.preset`` is the architecture registered weights belong to.

    ``FetchError`` for an unknown name, gated weights (DINOv3: pass the signed URL), a failed
    download, or a missing entry while offline.
    """
    weights = _registered(name)
    if weights is not None:
        if weights.url is None:
            raise FetchError(
                f"{name}: the weights {weights.name} are gated: {weights.gated} for "
                f"{weights.file_name} (the hash in its name is checked)")
        return fetch_url(weights.url, stream=stream, show_progress=show_progress,
                         preset=weights.architecture, origin=weights.name)
    if name.startswith(HF_PREFIX):
        return fetch_hf(name)
    if _is_url(name):
        return fetch_url(name, stream=stream, show_progress=show_progress)
    if registry.is_architecture(name):
        raise FetchError(f"{name}: no registered weights for this model; pass a weights file, URL or "
                         f"hf-hub:ORG/NAME")
    known = ", ".join(registry.list_pretrained())
    raise FetchError(f"{name}: no such file or folder, and not registered weights ({known}), "
                     f"an http(s):// URL or hf-hub:ORG/NAME")
