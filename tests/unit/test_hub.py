"""Weights by name, without the network: a loopback HTTP server for URLs and pretrained names, a
Hugging Face cache built here (``HF_HUB_OFFLINE=1``) for ``hf-hub:`` names."""

import hashlib
import http.server
import io
import json
import os
import pathlib
import threading
import urllib.parse

import numpy as np
import pytest

import subprocess
import sys
import time

import jax_adapter
from jax_adapter import hub, registry
from jax_adapter.errors import ConversionError, FetchError
from tests.helpers import FIXTURES, ROOT, load_npz, run_cli, run_cli_ok

TRUNK_PTH = FIXTURES / "dinov2_tiny_noreg.pth"
TRUNK_CONFIG = str(FIXTURES / "dinov2_tiny_noreg.json")  # heads are not in the tensors of a toy width
TRUNK_BYTES = TRUNK_PTH.read_bytes()
TRUNK_SHA = hashlib.sha256(TRUNK_BYTES).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck connection ends by itself

    def do_GET(self):  # noqa: N802 (the http.server name)
        srv = self.server
        path = urllib.parse.urlsplit(self.path).path
        srv.requests.append(self.path)
        time.sleep(srv.delay)
        if path not in srv.files:
            self.send_error(404, "not found")
            return
        body = srv.files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in srv.dies:
            # The server dies half-way: half the promised bytes, then the connection closes.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """``(base_url, server)`` of an HTTP server on 127.0.0.1 that serves ``server.files`` and
    records ``server.requests``; shut down at the end of the test."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.dies, srv.requests, srv.delay = {}, set(), [], 0.0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty ``$JAX_ADAPTER_CACHE``, online."""
    d = tmp_path / "cache"
    monkeypatch.setenv("JAX_ADAPTER_CACHE", str(d))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return d


def _files(root: pathlib.Path):
    """The cache's files but for its lock files (``locks/``: empty, they hold no data)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.parent != root / "locks") if root.exists() else []


def _entries(root: pathlib.Path):
    """Files and folders under ``root``, but for the empty ``downloads`` folder and the locks."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p not in (root / "downloads", root / "locks") and p.parent != root / "locks")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_download_shows_progress_writes_atomically_and_hits_the_cache(server, cache):
    base, srv = server
    srv.files["/weights/dinov2_tiny_noreg.pth"] = TRUNK_BYTES
    url = base + "/weights/dinov2_tiny_noreg.pth"
    bar = _Tty()
    got = hub.fetch(url, stream=bar)
    assert pathlib.Path(got.path).read_bytes() == TRUNK_BYTES
    assert got.identity == "sha256:" + TRUNK_SHA
    assert got.path.startswith(str(cache / "downloads"))
    shown = bar.getvalue()
    assert "downloading" in shown and "100%" in shown, shown
    # Only the file and its record: no temporary left behind.
    entry = os.path.relpath(got.path, cache)
    assert _files(cache) == sorted([entry, entry + ".json"])
    assert json.loads(pathlib.Path(got.path + ".json").read_text())["sha256"] == TRUNK_SHA
    assert len(srv.requests) == 1
    # Second call: the cache, no request; a new signature on the same URL is the same file.
    again = hub.fetch(url + "?Signature=abc&Expires=1")
    assert again == got
    assert len(srv.requests) == 1
    # Not a terminal: no bar.
    quiet = io.StringIO()
    hub.download(url, str(cache / "other" / "x.pth"), stream=quiet)
    assert quiet.getvalue() == ""


def test_hash_prefix_in_the_name_is_verified(server, cache):
    base, srv = server
    good, bad = f"/w/model-{TRUNK_SHA[:8]}.pth", "/w/model-deadbeef.pth"
    srv.files[good] = srv.files[bad] = TRUNK_BYTES
    assert hub.fetch(base + good).identity == "sha256:" + TRUNK_SHA
    with pytest.raises(ConversionError, match="deadbeef"):
        hub.fetch(base + bad)
    assert not any("deadbeef" in f for f in _files(cache)), _files(cache)
    assert not any(os.path.basename(f).startswith(".") for f in _files(cache)), _files(cache)


def test_hash_prefix_of_names():
    assert hub.hash_prefix("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth") == "eadcf0ff"
    assert hub.hash_prefix("/x/dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth") == "a955f4ea"
    assert hub.hash_prefix("dinov2_vits14_reg4_pretrain.pth") is None
    assert hub.hash_prefix("model-ABCDEF12.pth") is None  # hex digests are lower case
    hub.check_hash_prefix("w-abcdef12.pth", "abcdef12" + "0" * 56)
    with pytest.raises(ConversionError):
        hub.check_hash_prefix("w-abcdef12.pth", "abcdef13" + "0" * 56)


def test_server_dying_half_way_leaves_nothing(server, cache):
    base, srv = server
    srv.files["/w/big.pth"] = TRUNK_BYTES
    srv.dies.add("/w/big.pth")
    with pytest.raises(FetchError, match="incomplete|failed"):
        hub.fetch(base + "/w/big.pth")
    assert _entries(cache) == []
    # Once the server behaves, the same name downloads.
    srv.dies.clear()
    assert pathlib.Path(hub.fetch(base + "/w/big.pth").path).read_bytes() == TRUNK_BYTES


def test_http_errors_and_bad_names(server, cache):
    base, _ = server
    with pytest.raises(FetchError, match="404"):
        hub.fetch(base + "/missing.pth")
    with pytest.raises(FetchError, match="expected a URL of a"):
        hub.fetch(base + "/page.html")
    with pytest.raises(FetchError, match="signed URL"):
        hub.fetch("dinov3_vitl16_sat")
    with pytest.raises(FetchError, match="dinov2_vits14"):
        hub.fetch("no_such_model")
    assert _entries(cache) == []


def test_offline_uses_the_cache_and_names_what_to_fetch(server, cache, monkeypatch):
    base, srv = server
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = registry.weights("dinov2_vits14.lvd142m").url
    with pytest.raises(FetchError) as e:
        hub.fetch("dinov2_vits14")
    msg = str(e.value)
    assert url in msg and hub.url_cache_path(url) in msg and "HF_HUB_OFFLINE" in msg
    # A file put where the message says is used (hashed and recorded once), without any request.
    dst = pathlib.Path(hub.url_cache_path(url))
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"not really weights")
    got = hub.fetch("dinov2_vits14")
    assert got.identity == "sha256:" + hashlib.sha256(b"not really weights").hexdigest()
    assert got.preset == "dinov2_vits14" and got.origin == "dinov2_vits14.lvd142m"
    assert srv.requests == []
    assert url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert registry.weights("dinov2_vitg14_reg.lvd142m").url.endswith("/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth")
    assert len(registry.list_pretrained("dinov2*", include_gated=False)) == 8


def _patch_tokens(model, x):
    return np.asarray(model(x).patches)


def test_load_pretrained_url_converts_once_then_loads(server, cache, monkeypatch):
    base, srv = server
    srv.files["/dinov2_tiny_noreg.pth"] = TRUNK_BYTES
    url = base + "/dinov2_tiny_noreg.pth"
    model = jax_adapter.load_pretrained(url, TRUNK_CONFIG, trunk_only=True)
    io_ = load_npz("dinov2_tiny_noreg_io.npz")
    x = io_["input0"].transpose(0, 2, 3, 1)
    err = np.abs(_patch_tokens(model, x) - io_["input0_x_norm_patchtokens"]).max()
    assert err < 1e-4, err
    entries = os.listdir(cache / "checkpoints")
    assert len(entries) == 1
    record = json.loads((cache / "checkpoints" / entries[0] / "jax_adapter.json").read_text())
    assert record["kind"] == "dinov2" and record["provenance"]["origin"] == url
    assert record["provenance"]["sha256"] == TRUNK_SHA

    # Second call: no request, no conversion; offline too.
    import jax_adapter.convert.pipeline as pipeline

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(pipeline, "convert_file", no_conversion)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = jax_adapter.load_pretrained(url, TRUNK_CONFIG, trunk_only=True)
    assert len(srv.requests) == 1
    np.testing.assert_array_equal(_patch_tokens(again, x[:1]), _patch_tokens(model, x[:1]))
    # Other options are another entry (and would need a conversion).
    with pytest.raises(AssertionError, match="converted again"):
        jax_adapter.load_pretrained(url, TRUNK_CONFIG, trunk_only=True, dtype="bfloat16")


def test_cli_convert_and_offline_error(server, cache, tmp_path, capsys, monkeypatch):
    base, srv = server
    srv.files["/dinov2_tiny_noreg.pth"] = TRUNK_BYTES
    url = base + "/dinov2_tiny_noreg.pth"
    dst = str(tmp_path / "out")
    prov = run_cli_ok(["convert", url, dst, "--trunk-only", "--config", TRUNK_CONFIG], capsys)
    assert prov["origin"] == url and prov["sha256"] == TRUNK_SHA
    assert jax_adapter.checkpoint.read_record(dst)["kind"] == "dinov2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = run_cli(["convert", "dinov2_vitb14", str(tmp_path / "b")], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and registry.weights("dinov2_vitb14.lvd142m").url in err, err
    assert not (tmp_path / "b").exists()


# --- Hugging Face: a local cache, offline ---------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_repo(hf_cache: pathlib.Path, repo: str):
    """A snapshot of a small random transformers ``Dinov2Model`` in a Hugging Face cache layout
    (``models--ORG--NAME/refs/main`` -> ``snapshots/<commit>/``); returns the torch model."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=56, patch_size=14))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.eval()
    storage = hf_cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    model.save_pretrained(str(snapshot))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return model


@pytest.fixture
def hf_offline(tmp_path, monkeypatch, cache):
    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_cache


def test_hf_hub_name_loads_from_the_local_cache_offline(hf_offline, cache):
    import torch

    ref = _hf_repo(hf_offline, "testorg/tiny-dinov2")
    x = np.random.default_rng(0).standard_normal((1, 56, 70, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    for name in ("hf-hub:testorg/tiny-dinov2", f"hf-hub:testorg/tiny-dinov2@{COMMIT}"):
        model = jax_adapter.load_pretrained(name, trunk_only=True)
        err = np.abs(_patch_tokens(model, x) - want[:, 1:]).max()
        assert err < 1e-4, (name, err)
    # Both names are one snapshot: one converted entry.
    assert len(os.listdir(cache / "checkpoints")) == 1
    fetched = hub.fetch("hf-hub:testorg/tiny-dinov2")
    assert fetched.identity == f"hf:testorg/tiny-dinov2@{COMMIT}"


def test_hf_hub_missing_repo_offline_says_what_to_fetch(hf_offline, cache):
    with pytest.raises(FetchError) as e:
        jax_adapter.load_pretrained("hf-hub:testorg/absent@v2")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "hf download testorg/absent --revision v2" in msg, msg
    assert _files(cache) == []
    for bad in ("hf-hub:no-slash", "hf-hub:a/b@", "hf-hub:a/b/c"):
        with pytest.raises(FetchError, match="expected hf-hub:ORG/NAME"):
            hub.fetch(bad)


def test_local_source_files_are_converted_once(cache, tmp_path, monkeypatch):
    src = tmp_path / "trunk.pth"
    src.write_bytes(TRUNK_BYTES)
    a = jax_adapter.load_pretrained(str(src), TRUNK_CONFIG, trunk_only=True)
    assert len(os.listdir(cache / "checkpoints")) == 1
    import jax_adapter.convert.pipeline as pipeline

    real = pipeline.convert_file
    calls = []
    monkeypatch.setattr(pipeline, "convert_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    b = jax_adapter.load_pretrained(str(src), TRUNK_CONFIG, trunk_only=True)
    assert calls == []
    x = np.zeros((1, 28, 28, 3), np.float32)
    np.testing.assert_array_equal(_patch_tokens(a, x), _patch_tokens(b, x))
    # A changed file is a new entry.
    os.utime(src, ns=(1, 1))
    jax_adapter.load_pretrained(str(src), TRUNK_CONFIG, trunk_only=True)
    assert len(calls) == 1 and len(os.listdir(cache / "checkpoints")) == 2
    # An empty folder is neither a checkpoint nor a source: the message says both.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a jax-adapter checkpoint directory.*nor a model folder"):
        jax_adapter.load_pretrained(str(tmp_path / "empty"))


# --- several processes sharing one cache --------------------------------------------------------

CHILD = r"""
import json, os, sys, time
import numpy as np
import jax_adapter
import jax_adapter.convert.pipeline as pipeline

url, config, ready, go, log = sys.argv[1:6]
real = pipeline.convert_file

def counted(*a, **k):
    with open(log, "a") as f:
        f.write("converted\n")
    return real(*a, **k)

pipeline.convert_file = counted
open(ready, "w").close()
while not os.path.exists(go):  # every process starts its fetch at once
    time.sleep(0.01)
model = jax_adapter.load_pretrained(url, config, trunk_only=True)
x = np.ones((1, 28, 28, 3), np.float32)
print(json.dumps(float(np.asarray(model(x).patches, np.float64).sum())))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_six_processes_loading_one_url_download_and_convert_it_once(server, cache, tmp_path):
    base, srv = server
    srv.files["/w/dinov2_tiny_noreg.pth"] = TRUNK_BYTES
    # The response takes a while, so that every process asks while the first download runs.
    srv.delay = 1.0
    url, n = base + "/w/dinov2_tiny_noreg.pth", 6
    sync = tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ADAPTER_CACHE=str(cache), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, url, TRUNK_CONFIG, str(sync / f"ready{i}"),
                               str(sync / "go"), str(sync / "log")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.monotonic() + 240
    while len(list(sync.glob("ready*"))) < n and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    (sync / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    sums = {out.strip() for out, _ in outs}
    assert len(sums) == 1  # every process got the same weights
    assert len(srv.requests) == 1, srv.requests  # one download
    assert (sync / "log").read_text().count("converted") == 1  # one conversion
    assert len(os.listdir(cache / "checkpoints")) == 1
    assert [f for f in _files(cache) if os.path.basename(f).startswith(".")] == []
