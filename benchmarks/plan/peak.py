"""What is live at the peak of a compiled program, by model part: read from an XLA dump.

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text" \
        jax-adapter plan --target h100 --preset dinov2_vitb14 --batch 6 --freeze-trunk
    python -m benchmarks.plan.peak DUMP [--json OUT] [--top 40]

Reads the largest module's ``*after_optimizations-live-range.txt`` (every buffer live at the heap
simulation's peak, with its size) and ``*after_optimizations.txt`` (each instruction's shape,
``op_name`` and ``stack_frame_id``, and the tables that turn a frame id into the Python call
stack). Each buffer is attributed to a model part from its stack (trunk attention core, trunk
MLP, injector/extractor pieces, SPM, ...) and to the innermost project source line.

The heap simulation's live set is not what every backend reports as its peak: libtpu's
``peak_memory_in_bytes`` follows the size of the temporary allocation, i.e. the highest
``offset + size`` that the buffer assignment packs into it, fragmentation included. So the report
also reads ``*after_optimizations-buffer-assignment.txt`` and lists the buffers that reach the top
of the default memory's temporary allocation, with their live ranges and what lies below the
highest one while it is live (``heap_top``; on a TPU, these set the peak).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
from typing import Dict, List, Tuple

PROJECT = ("/jax_adapter/", "/pallas_kernels/")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) (\S+?)\(")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
Frame = Tuple[str, str, int]  # file, function, line


def find_module(dump: str) -> Tuple[str, str]:
    found = glob.glob(os.path.join(dump, "*after_optimizations-live-range.txt"))
    if not found:
        raise SystemExit(f"no *after_optimizations-live-range.txt in {dump}")
    live = max(found, key=os.path.getsize)
    return live, live.replace("-live-range.txt", ".txt")


def parse_peak(text: str) -> Tuple[int, List[Tuple[str, str, int]]]:
    """The peak's step and its live buffers ``(instruction, tuple index, bytes)``."""
    m = re.search(r"Live ranges at (\d+) \(peak\):\n((?:    .*\n)+)", text)
    if m is None:
        raise SystemExit("no 'Live ranges at N (peak)' section in the live-range file")
    items = []
    for line in m.group(2).splitlines():
        b = re.match(r"\s+(\S+?)(\{[0-9,]*\})?: (\d+) bytes", line)
        if b:
            items.append((b.group(1), b.group(2) or "{}", int(b.group(3))))
    return int(m.group(1)), items


def parse_tables(text: str):
    """The source-location tables of an HLO text dump."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in text.splitlines():
        if line in _TABLES:
            section = line
            continue
        if section is None or not line.strip():
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if m is None:
            section = None
            continue
        i, rest = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[i] = rest.strip('"')
        else:
            d = dict(re.findall(r"(\w+)=(\d+)", rest))
            if section == "FileLocations":
                locs[i] = (int(d["file_name_id"]), int(d["function_name_id"]), int(d["line"]))
            else:  # the printer writes the parent as its id + 1 (1 is the root)
                frames[i] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)
    return files, funcs, locs, frames


def stack(frame: int, tables) -> List[Frame]:
    """Innermost first."""
    files, funcs, locs, frames = tables
    out, seen = [], set()
    while frame and frame in frames and frame not in seen:
        seen.add(frame)
        loc, frame_parent = frames[frame]
        f, fn, line = locs[loc]
        out.append((files[f], funcs[fn], line))
        frame = frame_parent
    return out


def parse_instructions(text: str) -> Dict[str, Tuple[str, str, str, int]]:
    """Instruction -> (shape, opcode, op_name, stack frame); a fusion without metadata takes its
    called computation's root's (or that of the first instruction with a stack)."""
    out, calls, comps, roots = {}, {}, {}, {}
    comp = None
    for line in text.splitlines():
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            comp = c.group(1)
            comps[comp] = []
            continue
        m = _INSTR.match(line)
        if m is None:
            continue
        name, shape, opcode = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        called = re.search(r"calls=%([^,\s]+)", line)
        out[name] = (shape, f"custom-call:{target.group(1)}" if target else opcode,
                     op_name.group(1) if op_name else "", int(frame.group(1)) if frame else 0)
        if called:
            calls[name] = called.group(1)
        if comp is not None:
            comps[comp].append(name)
            if line.lstrip().startswith("ROOT"):
                roots[comp] = name

    def meta(name: str, depth: int = 0) -> Tuple[str, int]:
        _, _, op_name, frame = out[name]
        if op_name or frame or depth > 4 or name not in calls:
            return op_name, frame
        inner = calls[name]
        for candidate in ([roots[inner]] if inner in roots else []) + comps.get(inner, []):
            o, f = meta(candidate, depth + 1)
            if f:
                return o, f
        return op_name, frame

    for name, (shape, opcode, op_name, frame) in list(out.items()):
        if not (op_name or frame):
            out[name] = (shape, opcode, *meta(name))
    return out


def part_of(frames: List[Frame]) -> str:
    """A model part from the Python stack (innermost first)."""
    names = " ".join(fn for _, fn, _ in frames)
    files = {os.path.basename(f) for f, _, _ in frames}
    if any("optax" in f for f, _, _ in frames) and "segmentation_loss" not in names:
        return "optimizer (AdamW)"
    if "DenseHead.__call__" in names:
        return "dense head"
    if "segmentation_loss" in names and "SegmentationModel.__call__" not in names:
        return "loss"
    if "SpatialPriorModule.__call__" in names:
        return "SPM"
    if "ConvFFN.__call__" in names:
        return "extractor ConvFFN"
    for key, label in (("Injector.__call__", "injector"), ("Extractor.__call__", "extractor")):
        if key in names:
            if files & {"msda.py", "msda_xla.py", "msda_dense.py", "fused.py", "_kernels.py", "tpu.py"}:
                return f"{label}: MSDA sampling core"
            return f"{label}: {'MSDA projections' if 'MSDeformAttn.__call__' in names else 'norms/residual'}"
    if "Attention.__call__" in names:
        return "trunk attention core" if "attention.py" in files else "trunk attention qkv/proj"
    if "Mlp.__call__" in names or "SwiGLU" in names:
        return "trunk MLP"
    if "Block.__call__" in names:
        return "trunk block norms/residual"
    if "embed_tokens" in names:
        return "patch embed"
    if "InteractionBlock.__call__" in names:
        return "interaction concat/split"
    if "neck_out" in names:
        return "adapter outputs (up, BN)"
    if "neck_in" in names:
        return "adapter inputs (level embeddings)"
    if "Adapter.__call__" in names:
        return "adapter, other"
    return "other"


def where(frames: List[Frame]) -> str:
    return next((f"{os.path.basename(f)}:{fn}:{ln}" for f, fn, ln in frames if any(p in f for p in PROJECT)), "-")


_VALUE = re.compile(r" value: <\d+ (\S+?)(\{[0-9,]*\})? @0> \(size=(\d+),offset=(\d+)\): (\S+)")


def parse_temp_allocation(text: str) -> Tuple[int, List[Tuple[str, int, int, str]]]:
    """The default memory's preallocated temporary allocation (no ``color``): its size and its
    values ``(buffer, offset, size, shape)``."""
    m = re.search(r"^allocation \d+: size (\d+), preallocated-temp:\n((?: value:.*\n)+)", text, re.M)
    if m is None:
        return 0, []
    values = []
    for line in m.group(2).splitlines():
        v = _VALUE.match(line)
        if v:
            values.append((v.group(1) + (v.group(2) or "{}"), int(v.group(4)), int(v.group(3)), v.group(5)))
    return int(m.group(1)), values


def parse_live_ranges(text: str) -> Dict[str, Tuple[int, int]]:
    """Buffer -> (first, last) step of the program order."""
    return {m.group(1) + (m.group(2) or "{}"): (int(m.group(3)), int(m.group(4)))
            for m in re.finditer(r"^\s+(\S+?)(\{[0-9,]*\})?\s*:\s*(\d+)-(\d+)\s*$", text, re.M)}


def heap_top(dump: str, live_text: str, instrs, tables, top: int = 12, min_bytes: int = 1 << 20) -> dict:
    """The buffers reaching highest in the temporary allocation, and what is live below the
    highest one (empty when the dump has no buffer-assignment file)."""
    found = glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt"))
    if not found:
        return {}
    with open(max(found, key=os.path.getsize)) as f:
        size, values = parse_temp_allocation(f.read())
    ranges = parse_live_ranges(live_text)

    def row(name, offset, nbytes, shape):
        frames = stack(instrs.get(name.split("{")[0], ("", "", "", 0))[3], tables)
        return {"buffer": name, "offset": offset, "bytes": nbytes, "end": offset + nbytes,
                "shape": re.sub(r"\{[^}]*\}", "", shape), "live": ranges.get(name),
                "part": part_of(frames), "where": where(frames)}

    big = sorted((row(*v) for v in values if v[2] >= min_bytes), key=lambda r: -r["end"])
    if not big or big[0]["live"] is None:
        return {"temp_bytes": size, "top": big[:top], "below": []}
    first, last = big[0]["live"]
    below = [r for r in big if r["live"] and r["live"][0] <= last and r["live"][1] >= first and r is not big[0]]
    return {"temp_bytes": size, "top": big[:top], "below": sorted(below, key=lambda r: r["offset"])}


def report(dump: str) -> dict:
    live_path, hlo_path = find_module(dump)
    with open(live_path) as f:
        live_text = f.read()
    step, items = parse_peak(live_text)
    with open(hlo_path) as f:
        hlo = f.read()
    tables, instrs = parse_tables(hlo), parse_instructions(hlo)
    rows = []
    for name, index, nbytes in items:
        shape, opcode, op_name, frame = instrs.get(name, ("?", "?", "", 0))
        if index != "{}" and shape.startswith("("):
            k = int(index.strip("{}").split(",")[0])
            parts = re.findall(r"[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?", shape)
            shape = parts[k] if k < len(parts) else shape
        frames = stack(frame, tables)
        rows.append({
            "buffer": name + index, "bytes": nbytes, "shape": re.sub(r"\{[^}]*\}", "", shape), "opcode": opcode,
            "phase": "backward" if "transpose(" in op_name else ("forward" if "jvp(" in op_name else "-"),
            "part": "arguments (parameters, optimizer state, batch)" if opcode == "parameter" else part_of(frames),
            "where": where(frames),
        })
    return {"module": os.path.basename(hlo_path), "peak_step": step, "live_bytes": sum(r["bytes"] for r in rows),
            "parts": dict(_by(rows, "part").most_common()), "rows": rows,
            "heap_top": heap_top(dump, live_text, instrs, tables)}


def _by(rows: List[dict], key: str) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for r in rows:
        c[r[key]] += r["bytes"]
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump", help="the --xla_dump_to directory")
    p.add_argument("--top", type=int, default=30, help="source lines to list")
    p.add_argument("--json", help="write the whole report here")
    args = p.parse_args()
    rep = report(args.dump)
    print(f"{rep['module']}: {len(rep['rows'])} buffers live at the peak, {rep['live_bytes'] / 1e9:.3f} GB")
    print(f"\n{'part':48s} {'GB':>8s} {'share':>6s}")
    for part, b in _by(rep["rows"], "part").most_common():
        print(f"{part:48s} {b / 1e9:8.3f} {b / rep['live_bytes']:6.1%}")
    print(f"\n{'innermost project line':60s} {'GB':>8s}")
    for w, b in _by(rep["rows"], "where").most_common(args.top):
        print(f"{w:60s} {b / 1e9:8.3f}")
    ht = rep["heap_top"]
    if ht.get("top"):
        print(f"\ntop of the temporary allocation ({ht['temp_bytes'] / 1e6:.1f} MB): buffers by offset + size")
        for r in ht["top"]:
            print(f"  {r['end'] / 1e6:8.1f} MB  {r['bytes'] / 1e6:7.1f} MB at {r['offset'] / 1e6:7.1f}  "
                  f"steps {r['live']}  {r['shape']:28s} {r['where']}")
        print("  live below the highest one:")
        for r in ht["below"]:
            print(f"  {r['offset'] / 1e6:8.1f} MB +{r['bytes'] / 1e6:7.1f}  steps {r['live']}  {r['shape']:28s} {r['where']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
