"""``.safetensors`` through the ``safetensors`` package: bit-exact bfloat16, strided arrays,
one-line errors for damaged files; and the terminal-only progress bar."""

import io
import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jax_adapter import progress
from jax_adapter.convert.safetensors_io import is_safetensors, read_safetensors, write_safetensors
from jax_adapter.errors import ConversionError


def _arrays():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    return {
        "w": w,
        "w_t": w.T,  # a strided view: must be written in its logical (row-major) order
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "count": np.array(7, np.int64),
        "mask": np.array([True, False, True]),
    }


def test_round_trip_is_bit_exact(tmp_path):
    path = str(tmp_path / "w.safetensors")
    arrays = _arrays()
    write_safetensors(path, arrays, {"format": "pt"})
    assert is_safetensors(path)
    handles = read_safetensors(path)
    assert set(handles) == set(arrays)
    for k, a in arrays.items():
        h = handles[k]
        assert (h.shape, h.dtype) == (a.shape, a.dtype), k
        got = h.load()
        assert got.dtype == a.dtype and got.shape == a.shape, k
        assert got.tobytes() == np.ascontiguousarray(a).tobytes(), k  # bits, not values: bfloat16 too
    # The package's own reader agrees (the file is standard), metadata included.
    ref = safetensors.numpy.load_file(path)
    np.testing.assert_array_equal(ref["w_t"], arrays["w"].T)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert header["__metadata__"] == {"format": "pt"} and header["bf16"]["dtype"] == "BF16"


def test_loaded_arrays_are_private_copies(tmp_path):
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, {"w": np.zeros((4, 4), np.float32)})
    h = read_safetensors(path)["w"]
    a = h.load()
    a[...] = 1  # must touch neither the file nor the next load
    assert h.load().sum() == 0 and safetensors.numpy.load_file(path)["w"].sum() == 0


def _damaged(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_damaged_files_give_one_line_errors(tmp_path):
    good = str(tmp_path / "good.safetensors")
    write_safetensors(good, _arrays())
    data = open(good, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])

    def rewrite(h):
        blob = json.dumps(h).encode()
        return struct.pack("<Q", len(blob)) + blob + data[8 + n:]

    cases = {
        "truncated": (data[: len(data) - 10], "truncated: tensor data does not match the file size"),
        "trailing": (data + b"\0" * 16, "truncated: tensor data does not match the file size"),
        "json": (data[:9] + b"!!" + data[11:], "invalid JSON in header"),
        "offsets": (rewrite({**header, "w": {**header["w"], "shape": [5, 8]}}), "invalid shape, data type, or offset"),
        "dtype": (rewrite({**header, "w": {**header["w"], "dtype": "F99"}}), "unknown variant `F99`"),
        "header_length": (struct.pack("<Q", 1 << 20) + data[8:200], "invalid header length"),
    }
    for name, (content, why) in cases.items():
        path = _damaged(tmp_path, f"{name}.safetensors", content)
        with pytest.raises(ConversionError) as e:
            read_safetensors(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a readable safetensors file (") and why in msg, (name, msg)
        assert "\n" not in msg, name


def test_unconvertible_dtype_is_named(tmp_path):
    path = str(tmp_path / "u16.safetensors")
    safetensors.numpy.save_file({"ids": np.arange(3, dtype=np.uint16)}, path)
    with pytest.raises(ConversionError, match=r"tensor 'ids' has dtype U16, which cannot be converted"):
        read_safetensors(path)
    out = tmp_path / "c.safetensors"
    with pytest.raises(ConversionError, match="complex64 cannot be stored"):
        write_safetensors(str(out), {"c": np.zeros(2, np.complex64)})
    assert not out.exists()


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "MIN_BYTES", 100)
    quiet, small, tty = io.StringIO(), _Tty(), _Tty()
    for stream, total in ((quiet, 1000), (small, 99), (tty, 1000)):
        with progress.progress_bar(total, "hashing", stream=stream) as bar:
            bar.update(total)
    assert quiet.getvalue() == "" and small.getvalue() == ""  # not a terminal; too little work
    last = tty.getvalue().split("\r")[-1]
    assert last.startswith("hashing") and "100%" in last and tty.getvalue().endswith("\n")


def test_progress_bar_counts_steps_from_a_resumed_step():
    tty = _Tty()
    with progress.progress_bar(10, "training", unit="step", initial=4, stream=tty) as bar:
        bar.set_postfix(loss="0.1234", refresh=False)
        bar.update(1)
    last = tty.getvalue().split("\r")[-1]
    assert "5/10" in last and "loss=0.1234" in last and "50%" in last


def test_progress_bar_on_a_terminal_without_a_size():
    # A fresh pseudo-terminal reports 0x0 (as under `script` or some CI runners): tqdm would hide
    # the bar there unless given a size.
    import os
    import pty
    import select

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            assert stream.isatty() and os.get_terminal_size(slave).columns == 0
            with progress.progress_bar(3, "training", unit="step", stream=stream) as bar:
                bar.update(3)
        chunks = []
        while select.select([master], [], [], 0.2)[0]:
            chunks.append(os.read(master, 1 << 16))
        out = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "training" in out and "3/3" in out


def test_progress_bar_of_unknown_size_counts_bytes():
    tty = _Tty()
    with progress.progress_bar(None, "downloading", stream=tty) as bar:  # no Content-Length
        bar.update(5 << 20)
    last = tty.getvalue().split("\r")[-1]
    assert last.startswith("downloading") and "5.00M" in last and "%" not in last
