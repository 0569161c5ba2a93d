"""Time of ``load_pretrained(URL)`` on the first call (download, convert, load) and the second
(the cached checkpoint), beside the manual recipe it replaces (download the file yourself, then
``convert_file`` and ``load_pretrained`` of the directory).

    python -m benchmarks.cpu.pretrained_cache [--preset dinov2_vits14] [--repeat 3]

The weights are a synthetic DINOv2 hub ``.pth`` of the preset's real shapes (random values),
served over HTTP from 127.0.0.1, so the download is a loopback transfer: the numbers show what
the cache and the conversion cost, not a network. Each repetition runs the three paths in turn,
each in a fresh process and a fresh cache, so that they see the same machine load; the record
holds the medians, every run, and the 1-minute load average. Results go to
``benchmarks/results/pretrained_cache-cpu.json``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading

from benchmarks.common import RESULTS, machine_info
from benchmarks.cpu.convert_vitg import make_source

CHILD = r"""
import json, os, sys, time, urllib.request
t0 = time.perf_counter()
import jax_adapter
from jax_adapter.pretrained import load_checkpoint
t1 = time.perf_counter()
mode, url, work = sys.argv[1:4]
times = {"import": t1 - t0}
if mode == "load_pretrained":
    for call in ("first_call", "second_call"):
        s = time.perf_counter()
        jax_adapter.load_pretrained(url, trunk_only=True)
        times[call] = time.perf_counter() - s
else:  # the manual recipe: fetch the file, convert it, load the directory
    from jax_adapter.convert.pipeline import convert_file
    s = time.perf_counter()
    path = os.path.join(work, "weights.pth")
    with urllib.request.urlopen(url) as r, open(path, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    convert_file(path, os.path.join(work, "ckpt"), trunk_only=True)
    load_checkpoint(os.path.join(work, "ckpt"))
    times["first_call"] = time.perf_counter() - s
    s = time.perf_counter()
    load_checkpoint(os.path.join(work, "ckpt"))
    times["second_call"] = time.perf_counter() - s
print(json.dumps(times))
"""


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dinov2_vits14")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "pretrained_cache-cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        name = f"{args.preset}_pretrain.pth"
        info = make_source(os.path.join(work, name), args.preset)
        size = os.path.getsize(os.path.join(work, name))
        handler = lambda *a, **k: _Files(*a, directory=work, **k)  # noqa: E731
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        runs = {"load_pretrained": [], "manual": []}
        try:
            for _ in range(args.repeat):
                for mode in runs:
                    with tempfile.TemporaryDirectory() as scratch:
                        env["JAX_ADAPTER_CACHE"] = os.path.join(scratch, "cache")
                        load = os.getloadavg()[0]
                        out = subprocess.run([sys.executable, "-c", CHILD, mode, url, scratch], env=env,
                                             check=True, capture_output=True, text=True).stdout
                        rec = json.loads(out.strip().splitlines()[-1])
                        rec["load_before"] = load
                        runs[mode].append(rec)
                        print(mode, rec, flush=True)
        finally:
            server.shutdown()
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("first_call", "second_call")}
           for m, rs in runs.items()}
    record = {
        "what": "load_pretrained(URL) first and second call vs the manual download + convert + load",
        "preset": args.preset, "source_bytes": size, **info, "repeat": args.repeat,
        "median_s": med,
        "ratio_first_call": med["load_pretrained"]["first_call"] / med["manual"]["first_call"],
        "second_over_first": med["load_pretrained"]["second_call"] / med["load_pretrained"]["first_call"],
        "runs": runs, "machine": {**machine_info(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("median_s", "ratio_first_call", "second_over_first")}))


if __name__ == "__main__":
    main()
