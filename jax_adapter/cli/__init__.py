"""The ``jax-adapter`` command line: ``convert``, ``export``, ``inspect``, ``demo`` and ``train``.

Errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

SEED_SIZES = ((256, 704), (224, 224), (900, 1600), (480, 640), (300, 500))


class CliError(Exception):
    pass


def _config(args):
    from jax_adapter import AdapterConfig
    from jax_adapter.presets import load_config_file

    if args.config and args.preset:
        raise CliError("give --config or --preset, not both")
    if args.config:
        return load_config_file(args.config)
    if args.preset:
        return AdapterConfig.preset(args.preset)
    raise CliError("the model config is needed: pass --config CONFIG.json or --preset NAME")


def cmd_convert(args) -> int:
    from jax_adapter.convert.pipeline import convert_file

    prov = convert_file(args.src, args.dst, args.config, preset=args.preset, prefix=args.prefix,
                        trunk_only=args.trunk_only, overwrite=args.overwrite, dtype=args.dtype)
    print(json.dumps({"written": args.dst, **prov}))
    return 0


def cmd_export(args) -> int:
    from jax_adapter.convert.pipeline import export_checkpoint

    print(json.dumps(export_checkpoint(args.ckpt, args.out, dinov2_only=args.dinov2_only,
                                       overwrite=args.overwrite, dtype=args.dtype)))
    return 0


def cmd_inspect(args) -> int:
    from jax_adapter.convert.pipeline import format_info, inspect_path

    info = inspect_path(args.path, prefix=args.prefix)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def cmd_demo(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from jax_adapter.checkpoint import load_pretrained
    from jax_adapter.models.dinov2_adapter import DinoAdapter
    from jax_adapter.training.synthetic import street_image

    if args.checkpoint:
        model = load_pretrained(args.checkpoint)
        name = args.checkpoint
    else:
        cfg = _config(args) if (args.config or args.preset) else None
        from jax_adapter import AdapterConfig

        cfg = cfg or AdapterConfig.preset("dinov2_vits14")
        model = DinoAdapter(cfg, rngs=nnx.Rngs(args.seed))
        model.eval()
        name = args.preset or args.config or "dinov2_vits14 (random weights)"
    sizes = [_parse_size(s) for s in args.sizes] if args.sizes else SEED_SIZES
    graph, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    print(f"model {name}: {sum(np.size(v) for v in jax.tree.leaves(state)):,} parameters, "
          f"backend {jax.default_backend()}")
    for h, w in sizes:
        geom = model.geometry(h, w)
        images = np.repeat(street_image(h, w), args.batch, axis=0)
        t0 = time.perf_counter()
        compiled = forward.lower(state, images).compile()
        t1 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, images))
        t2 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, images))
        t3 = time.perf_counter()
        levels = " ".join(f"f{i + 1}={tuple(f.shape[1:3])}" for i, f in enumerate(out.features))
        print(f"{h}x{w} (padded {geom.padded[0]}x{geom.padded[1]}, vit grid {geom.vit_grid}, "
              f"spm tokens {geom.num_spm_tokens}): {levels} vit={tuple(out.vit.shape[1:3])} | "
              f"compile {t1 - t0:.2f}s, first run {t2 - t1:.2f}s, run {t3 - t2:.3f}s")
        if not all(np.isfinite(np.asarray(f)).all() for f in out.features):
            raise CliError(f"non-finite output at {h}x{w}")
    return 0


def _parse_size(s: str):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise CliError(f"bad size {s!r}: expected HxW, e.g. 256x704") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-adapter", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a DinoAdapter or DINOv2 checkpoint (hub .pth, Hugging Face, "
                                       "detector) into a checkpoint directory")
    c.add_argument("src", help="a .pth/.bin/.safetensors file or a Hugging Face model folder")
    c.add_argument("dst", help="output checkpoint directory")
    c.add_argument("--config", help="config JSON completing or overriding what the tensors imply: "
                                    "AdapterConfig fields, DINOv2 hub vit_* arguments or a Hugging Face config.json")
    c.add_argument("--preset", help="a named preset instead of --config, e.g. dinov2_vitb14")
    c.add_argument("--prefix", help="key prefix of the backbone inside a detector checkpoint "
                                    "(detected when there is only one backbone)")
    c.add_argument("--trunk-only", action="store_true",
                   help="write the DINOv2 trunk alone (load_pretrained then returns a DinoV2)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), help="dtype of the stored arrays")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="write a checkpoint directory as a PyTorch state dict "
                                      "(seed DinoAdapter names; DINOv2 hub names for the trunk)")
    e.add_argument("ckpt", help="checkpoint directory written by convert (or by training)")
    e.add_argument("out", help="output file: .pth, .pt, .bin (torch.save) or .safetensors")
    e.add_argument("--dinov2-only", action="store_true", help="export the DINOv2 trunk alone, in hub names")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), help="dtype of the written tensors "
                                                                    "(default: as stored)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="show what a checkpoint (PyTorch or ours) holds: format, variant, "
                                       "parameter count, config")
    i.add_argument("path", help="a checkpoint directory, a .pth/.bin/.safetensors file or a Hugging Face folder")
    i.add_argument("--prefix", help="key prefix of the backbone inside a detector checkpoint")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="run the backbone on a synthetic image at the seed sizes, with timings")
    d.add_argument("--preset", help="preset name (default dinov2_vits14, random weights)")
    d.add_argument("--config", help="AdapterConfig JSON")
    d.add_argument("--checkpoint", help="a converted checkpoint directory")
    d.add_argument("--sizes", nargs="+", help="HxW sizes (default: the five seed sizes)")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    from jax_adapter.cli.train import add_parser as add_train_parser

    add_train_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"jax-adapter {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
