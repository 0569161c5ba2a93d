"""The ViT-S DinoAdapter train step and forward against its PyTorch peer, side by side, on CPU.

    pip install --no-build-isolation --no-deps torch-ms-deform-attn   # the peer's C++ core
    python -m benchmarks.cpu.train_step              # everything (about 15 minutes on 2 cores)
    python -m benchmarks.cpu.train_step --only step,parts --reps 3
    python -m benchmarks.cpu.train_step --quick      # smoke run: tiny sizes, one repetition

Both models hold the same weights (the JAX model's random init, with non-zero injector gammas
and sampling-offset weights so that every adapter path carries gradient, copied into the peer
through the checkpoint key table). The PyTorch side is ``benchmarks/torch_peer.py`` (checked
against the reference fixtures by ``tests/parity/test_torch_peer.py``) with the ``torch-ms-deform-attn``
C++ sampling kernel, or its pure-PyTorch core with ``--peer-msda pytorch``; torch is an optional
dependency of this benchmark only.

Sections (``--only``):

- ``step``: forward+backward of the whole backbone in train mode (BatchNorm on batch statistics),
  batch 2 at 256x704, loss ``sum_i <out_i, cot_i>`` over the five outputs with fixed random
  cotangents; trunk frozen (gradients for the adapter only) and not. Before timing, the two sides
  must agree on the loss and on every gradient.
- ``forward``: inference forward (eval mode) at 1x256x704 and 1x900x1600 (agreement checked).
- ``parts``: forward+backward (inputs and the part's parameters) of each part alone at the
  step's shapes: the attention core, one ViT block, the SPM, an injector, an extractor, its
  ConvFFN.

JAX and PyTorch run interleaved call by call, so load from other processes hits both alike;
medians over ``--reps`` calls after ``--warmup`` calls. Writes
``benchmarks/results/train_step-cpu.json``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.cpu.step_forms import LOOPS, jax_step
from benchmarks.common import check_quiet, machine_info, now, race, rel_err, restart_with, write_record
from jax_adapter import AdapterConfig, DinoAdapter
from jax_adapter.convert.keys import load_state_dict, to_state_dict
from jax_adapter import memory
from jax_adapter.nn.attention import dot_product_attention

try:
    import torch

    from benchmarks import torch_peer
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("needs torch (pip install torch) for the PyTorch peer")

# Agreement required before timing. Loss: relative. Outputs: relative to each output's largest
# magnitude. Gradients are judged against a float64 run of the peer, with errors relative to each
# array's largest magnitude (floored at 1e-3 of the largest gradient overall: the biases before a
# train-mode BatchNorm have a true gradient of zero). Outside the SPM, JAX must be within
# GRAD_RTOL of float64, or as close as PyTorch's own float32 is (within GRAD_SLACK times its
# error: bilinear sampling makes the sampling-offset gradients jump where a point crosses a pixel
# border). In the SPM, ReLUs sit after train-mode BatchNorms over ~10^7 activations, and float32
# rounding flips the ReLU mask of the odd activation within ~1e-6 of zero (one flip at c4 changes
# a whole output channel's weight gradient by ~10%, on either side); so there the error is
# measured in norm, ||jax - f64|| / ||f64||, which a few flipped elements move little, and must be
# below SPM_RTOL.
LOSS_RTOL, OUT_RTOL, GRAD_RTOL, GRAD_SLACK, SPM_RTOL = 1e-4, 1e-4, 1e-3, 4.0, 2e-2


def grad_agreement(jg: Dict[str, np.ndarray], tg: Dict[str, np.ndarray], t64: Dict[str, np.ndarray]):
    """Per gradient: (jax error, torch float32 error, bound, passed); errors as described above
    (for SPM arrays, in norm)."""
    floor = 1e-3 * max(np.abs(v).max() for v in t64.values())
    out = {}
    for k, ref in t64.items():
        if k.startswith("spm."):
            norm = max(np.linalg.norm(ref), floor)
            ej, et = float(np.linalg.norm(jg[k] - ref) / norm), float(np.linalg.norm(tg[k] - ref) / norm)
            bound = SPM_RTOL
        else:
            ej, et = rel_err(jg[k], ref, floor), rel_err(tg[k], ref, floor)
            bound = max(GRAD_RTOL, GRAD_SLACK * et)
        out[k] = (ej, et, bound, ej <= bound)
    return out


# ------------------------------------------------------------------------------------------
# Models with the same weights
# ------------------------------------------------------------------------------------------

def build_pair(cfg: AdapterConfig, peer_kwargs: dict, peer_msda: str, seed: int = 0):
    model = DinoAdapter(cfg, rngs=nnx.Rngs(seed))
    sd = to_state_dict(model)
    rng = np.random.default_rng(seed)
    for k in list(sd):
        # Trained-model-like values where the init leaves a path without gradient: injector
        # gammas (init 0) and the sampling-offset weights (init 0).
        if k.endswith("injector.gamma"):
            sd[k] = np.full_like(sd[k], 0.1)
        elif k.endswith("attn.sampling_offsets.weight"):
            sd[k] = (0.01 * rng.standard_normal(sd[k].shape)).astype(sd[k].dtype)
    load_state_dict(model, sd)
    peer = torch_peer.DinoAdapter(**peer_kwargs, msda=peer_msda)
    peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model, peer


def peer_kwargs(cfg: AdapterConfig) -> dict:
    return dict(num_heads=cfg.num_heads, embed_dim=cfg.embed_dim, depth=cfg.depth,
                pretrain_size=cfg.pretrain_size, patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio,
                conv_inplane=cfg.conv_inplane, n_points=cfg.n_points,
                deform_num_heads=cfg.deform_num_heads, init_values=cfg.init_values,
                interaction_indexes=cfg.interaction_indexes, with_cffn=cfg.with_cffn,
                cffn_ratio=cfg.cffn_ratio, deform_ratio=cfg.deform_ratio,
                add_vit_feature=cfg.add_vit_feature, use_extra_extractor=cfg.use_extra_extractor)


def nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------
# Train step
# ------------------------------------------------------------------------------------------

def float64_grads(peer, timg, tcots) -> Dict[str, np.ndarray]:
    """The peer's gradients in float64 (a copy; BatchNorm statistics of the original untouched)."""
    p64 = copy.deepcopy(peer).double()
    outs = p64(timg.double())
    sum((o * c.double()).sum() for o, c in zip(outs, tcots)).backward()
    return {k: p.grad.numpy() for k, p in p64.named_parameters() if p.grad is not None}


def step_section(cfg, args, record):
    b, (h, w) = args.batch, args.size
    rng = np.random.default_rng(1)
    images = rng.standard_normal((b, h, w, 3)).astype(np.float32)
    model, peer = build_pair(cfg, peer_kwargs(cfg), args.peer_msda)
    peer.train()
    timg = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        shapes = [o.shape for o in peer(timg)]
    cots_nchw = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    cots = [jnp.asarray(c.transpose(0, 2, 3, 1)) for c in cots_nchw]
    tcots = [torch.from_numpy(c) for c in cots_nchw]

    results = {}
    for freeze in (True, False):
        name = "frozen" if freeze else "unfrozen"
        for p in peer.parameters():
            p.requires_grad_(True)
        if freeze:
            torch_peer.freeze_trunk(peer)
        fn, graph, rest = jax_step(model, freeze, args.loop)
        x = jnp.asarray(images)

        def run_jax():
            return jax.block_until_ready(fn(x, cots))

        def run_torch():
            peer.zero_grad(set_to_none=True)
            outs = peer(timg)
            loss = sum((o * c).sum() for o, c in zip(outs, tcots))
            loss.backward()
            return loss

        # Agreement: loss and every gradient, by state-dict name, against float64.
        loss, grads = run_jax()
        tloss = float(run_torch().detach())
        jg = to_state_dict(nnx.merge(graph, grads, rest))
        tg = {k: p.grad.numpy() for k, p in peer.named_parameters() if p.grad is not None}
        t64 = float64_grads(peer, timg, tcots)
        assert set(tg) == set(t64), sorted(set(tg) ^ set(t64))[:5]
        errs = grad_agreement(jg, tg, t64)
        worst = max(errs, key=lambda k: errs[k][0] / errs[k][2])
        loss_err = abs(float(loss) - tloss) / abs(tloss)
        print(f"[step {name}] loss jax {float(loss):.6g} torch {tloss:.6g} (rel {loss_err:.1e}); "
              f"{len(errs)} gradients vs float64, closest to its bound {worst}: jax {errs[worst][0]:.1e}, "
              f"torch float32 {errs[worst][1]:.1e}, bound {errs[worst][2]:.1e}", flush=True)
        for k in sorted(k for k in errs if k.startswith("spm.")):
            print(f"    {k}: jax {errs[k][0]:.1e}, torch float32 {errs[k][1]:.1e}")
        if loss_err > LOSS_RTOL or not all(e[3] for e in errs.values()):
            sys.exit(f"step {name}: JAX and PyTorch disagree (loss {loss_err:.1e}, {worst} {errs[worst]})")
        t = race({"jax": run_jax, "torch": run_torch}, args.reps, args.warmup)
        results[name] = {**t, "ratio": t["jax"]["median_s"] / t["torch"]["median_s"],
                         "loss_rel_err": loss_err,
                         "grad_closest_to_bound": {"name": worst, "jax": errs[worst][0],
                                                   "torch_float32": errs[worst][1], "bound": errs[worst][2]},
                         "gradients_checked": len(errs)}
        print(f"[step {name}] jax {t['jax']['median_s']:.2f} s, torch {t['torch']['median_s']:.2f} s, "
              f"ratio {results[name]['ratio']:.2f}x; page faults per step: jax {t['jax']['page_faults_median']}, "
              f"torch {t['torch']['page_faults_median']}", flush=True)
    record["step"] = {"batch": b, "size": [h, w], "loop": args.loop, **results}


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------

def forward_section(cfg, args, record):
    model, peer = build_pair(cfg, peer_kwargs(cfg), args.peer_msda)
    model.eval()
    peer.eval()
    graph, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    out = {}
    for (h, w) in args.forward_sizes:
        images = np.random.default_rng(2).standard_normal((1, h, w, 3)).astype(np.float32)
        x, timg = jnp.asarray(images), torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

        def run_jax():
            return jax.block_until_ready(fwd(state, x))

        def run_torch():
            with torch.no_grad():
                return peer(timg)

        jo, to = run_jax(), run_torch()
        err = max(rel_err(np.asarray(a), nhwc(b)) for a, b in zip((*jo.features, jo.vit), to))
        print(f"[forward {h}x{w}] outputs agree to {err:.1e} (relative to each output's max)", flush=True)
        if err > OUT_RTOL:
            sys.exit(f"forward {h}x{w}: JAX and PyTorch disagree ({err:.1e})")
        t = race({"jax": run_jax, "torch": run_torch}, args.reps, args.warmup)
        out[f"{h}x{w}"] = {**t, "ratio": t["jax"]["median_s"] / t["torch"]["median_s"], "out_rel_err": err}
        print(f"[forward {h}x{w}] jax {t['jax']['median_s']:.2f} s, torch {t['torch']['median_s']:.2f} s, "
              f"ratio {out[f'{h}x{w}']['ratio']:.2f}x", flush=True)
    record["forward"] = out


# ------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------

def jax_part(module: nnx.Module, call: Callable, inputs: Sequence[np.ndarray], cot: np.ndarray,
             train_params: bool = True):
    """Jitted forward+backward of ``call(module, *inputs)`` w.r.t. the inputs and (unless
    ``train_params`` is false) the module's parameters; returns a zero-argument runner."""
    graph, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(m, inputs, cot):
        return jnp.vdot(call(m, *inputs), cot)

    @jax.jit
    def fb(params, rest, inputs, cot):
        m = nnx.merge(graph, params, rest)
        if not train_params:
            return nnx.value_and_grad(loss, argnums=1)(m, inputs, cot)
        return nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))(m, inputs, cot)

    xs, c = tuple(jnp.asarray(a) for a in inputs), jnp.asarray(cot)
    return lambda: jax.block_until_ready(fb(params, rest, xs, c))


def torch_part(module, call: Callable, inputs: Sequence[np.ndarray], cot: np.ndarray,
               train_params: bool = True):
    xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    tc = torch.from_numpy(np.ascontiguousarray(cot))
    params = [p for p in module.parameters()] if module is not None else []

    def run():
        leaves = [x.clone().requires_grad_(True) for x in xs]
        for p in params:
            p.requires_grad_(train_params)
            p.grad = None
        out = call(*leaves)
        torch.autograd.backward((out * tc).sum())
        return out
    return run


def parts_section(cfg, args, record):
    b, (h, w) = args.batch, args.size
    model, peer = build_pair(cfg, peer_kwargs(cfg), args.peer_msda)
    model.train()
    peer.train()
    geom = model.geometry(h, w)
    d, heads = cfg.embed_dim, cfg.num_heads
    nv, nc = geom.num_vit_tokens, geom.num_spm_tokens
    rng = np.random.default_rng(3)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    spm_levels = torch_peer.Levels(geom.level_shapes, torch.device("cpu"))
    vit_levels = torch_peer.Levels([geom.vit_grid], torch.device("cpu"))
    ref_inj = torch_peer.reference_points(vit_levels.shapes, torch.device("cpu"))
    ref_ext = torch_peer.reference_points(spm_levels.shapes, torch.device("cpu"))
    inter_j, inter_t = model.interactions[0], peer.interactions[0]
    hp, wp = geom.padded
    n_tok = nv + 1
    dh = d // heads

    # name -> (jax runner, torch runner)
    cases: Dict[str, Tuple[Callable, Callable]] = {}
    q = [r(b, n_tok, heads, dh) for _ in range(3)]
    g = r(b, n_tok, heads, dh)
    cases[f"attention [{b}, {n_tok}, {heads}, {dh}]"] = (
        jax_part(nnx.Dict(), lambda m, q, k, v: dot_product_attention(q, k, v), q, g),
        torch_part(None, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                   [a.transpose(0, 2, 1, 3) for a in q], g.transpose(0, 2, 1, 3)),
    )
    x, cot = r(b, n_tok, d), r(b, n_tok, d)
    cases["ViT block"] = (jax_part(model.blocks[0], lambda m, x: m(x), [x], cot),
                          torch_part(peer.blocks[0], peer.blocks[0], [x], cot))
    cases["ViT block, frozen (input gradient only)"] = (
        jax_part(model.blocks[0], lambda m, x: m(x), [x], cot, train_params=False),
        torch_part(peer.blocks[0], peer.blocks[0], [x], cot, train_params=False))
    img = r(b, hp, wp, 3)

    def spm_j(m, x):
        c1, c2, c3, c4 = m(x, geom)
        return jnp.sum(c1) + jnp.sum(c2) + jnp.sum(c3) + jnp.sum(c4)

    def spm_t(x):
        return sum(t.sum() for t in peer.spm(x))
    cases["SPM"] = (jax_part(model.spm, spm_j, [img], np.float32(1.0)),
                    torch_part(peer.spm, spm_t, [img.transpose(0, 3, 1, 2)], np.float32(1.0)))
    xv, c = r(b, nv, d), r(b, nc, d)
    cases["injector"] = (
        jax_part(inter_j.injector, lambda m, x, c: m(x, c, geom), [xv, c], r(b, nv, d)),
        torch_part(inter_t.injector, lambda x, c: inter_t.injector(x, ref_inj, c, spm_levels), [xv, c],
                   r(b, nv, d)))
    cases["extractor (with ConvFFN)"] = (
        jax_part(inter_j.extractor, lambda m, c, x: m(c, x, geom), [c, xv], r(b, nc, d)),
        torch_part(inter_t.extractor, lambda c, x: inter_t.extractor(c, ref_ext, x, vit_levels, spm_levels),
                   [c, xv], r(b, nc, d)))
    ffn_j, ffn_t = inter_j.extractor.ffn, inter_t.extractor.ffn
    cases["ConvFFN"] = (jax_part(ffn_j, lambda m, c: m(c, geom), [c], r(b, nc, d)),
                        torch_part(ffn_t, lambda c: ffn_t(c, spm_levels), [c], r(b, nc, d)))
    out = {}
    for name, (fj, ft) in cases.items():
        t = race({"jax": fj, "torch": ft}, args.reps_parts, args.warmup)
        out[name] = {**t, "ratio": t["jax"]["median_s"] / t["torch"]["median_s"]}
        print(f"[part {name}] jax {t['jax']['median_s'] * 1e3:.1f} ms, torch {t['torch']['median_s'] * 1e3:.1f} ms, "
              f"ratio {out[name]['ratio']:.2f}x", flush=True)
    record["parts"] = out


def markdown(record: dict) -> str:
    rows = ["| what | JAX | PyTorch | JAX / PyTorch |", "|---|---:|---:|---:|"]

    def row(name, t, unit=1.0, fmt="{:.2f} s"):
        rows.append(f"| {name} | {fmt.format(t['jax']['median_s'] * unit)} | "
                    f"{fmt.format(t['torch']['median_s'] * unit)} | **{t['ratio']:.2f}x** |")
    if "step" in record:
        s = record["step"]
        for k in ("frozen", "unfrozen"):
            row(f"train step, batch {s['batch']}, {s['size'][0]}x{s['size'][1]}, trunk {k}", s[k])
    for k, t in record.get("forward", {}).items():
        row(f"forward 1x{k} (eval)", t)
    for k, t in record.get("parts", {}).items():
        row(f"{k}, fwd+bwd", t, 1e3, "{:.1f} ms")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="step,forward,parts", help="comma-separated sections")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per side (step, forward)")
    ap.add_argument("--reps-parts", type=int, default=7, help="timed calls per side (parts)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peer-msda", default="cpp", choices=("cpp", "pytorch"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke run)")
    ap.add_argument("--allocator", default="retain", choices=("retain", "default"),
                    help="retain: the allocator setting import jax_adapter applies (jax_adapter.memory), "
                         "for both sides; default: glibc's defaults (re-executes once with "
                         f"{memory.OPT_OUT}=0)")
    ap.add_argument("--loop", default="user", choices=LOOPS,
                    help="user: the step as a user writes it (nnx.jit of nnx.value_and_grad on the module); "
                         "split: jax.jit of a pure function of the split state (as TrainStep)")
    ap.add_argument("--out", default=None, help="results file (default results/train_step-cpu.json)")
    args = ap.parse_args(argv)
    if args.allocator == "default" and os.environ.get(memory.OPT_OUT) != "0":
        restart_with({memory.OPT_OUT: "0"}, drop=memory.RETAIN_FREED_MEMORY)
    torch.set_num_threads(args.threads)
    cfg = AdapterConfig.preset("dinov2_vits14")
    args.batch, args.size, args.forward_sizes = 2, (256, 704), [(256, 704), (900, 1600)]
    if args.quick:
        cfg = cfg.replace(depth=4, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))
        args.size, args.forward_sizes, args.reps, args.reps_parts, args.warmup = (64, 96), [(64, 96)], 1, 1, 1
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(sections) - {"step", "forward", "parts"}
    if bad:
        ap.error(f"unknown section(s) {sorted(bad)}; choose from step, forward, parts")
    record = {"date": now(), "machine": machine_info(), "peer_msda": args.peer_msda,
              "model": "ViT-S DinoAdapter", "quick": args.quick, "reps": args.reps, "warmup": args.warmup,
              "allocator": args.allocator, "allocator_status": memory.status(), "loop": args.loop,
              "load_before": check_quiet("the JAX / PyTorch ratio")}
    for s in sections:
        {"step": step_section, "forward": forward_section, "parts": parts_section}[s](cfg, args, record)
    record["load_after"] = check_quiet("the JAX / PyTorch ratio")
    table = markdown(record)
    print(table)
    if not args.quick:
        print(f"wrote {write_record(record, args.out, 'train_step-cpu.json')}")


if __name__ == "__main__":
    main()
