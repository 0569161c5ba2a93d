"""The jax-adapter command line: convert, export, inspect, demo, show and train.

Bad input (the library's own errors, :class:`~jax_adapter.errors.JaxAdapterError`, and
``OSError`` for files) prints one line on stderr and exits with code 2; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from jax_adapter.errors import ConfigError, JaxAdapterError

SEED_SIZES = ((256, 704), (224, 224), (900, 1600), (480, 640), (300, 500))


class CliError(ConfigError):
    """A bad command-line option or combination (``jax-adapter train`` raises it too)."""


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
    from jax_adapter import hub
    from jax_adapter.convert.pipeline import convert_file

    src, origin, preset = args.src, None, args.preset
    if hub.is_remote(args.src):  # a pretrained name, URL or hf-hub: name: fetched through the cache
        fetched = hub.fetch(args.src)
        src, origin = fetched.path, fetched.origin
        if args.config is None and preset is None:
            preset = fetched.preset
    prov = convert_file(src, args.dst, args.config, preset=preset, prefix=args.prefix,
                        trunk_only=args.trunk_only, overwrite=args.overwrite, dtype=args.dtype,
                        origin=origin)
    print(json.dumps({"written": args.dst, **prov}))
    return 0


def cmd_export(args) -> int:
    from jax_adapter.convert.pipeline import export_checkpoint

    print(json.dumps(export_checkpoint(args.ckpt, args.out, dinov2_only=args.dinov2_only,
                                       trunk_only=args.trunk_only,
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

    from jax_adapter.models.dinov2_adapter import DinoAdapter
    from jax_adapter.training.synthetic import street_image

    stats = args.stats
    if args.checkpoint:
        model, source = _load_model(args.checkpoint)
        stats = stats or _stats_for(source)
        name = args.checkpoint
    else:
        cfg = _config(args) if (args.config or args.preset) else None
        from jax_adapter import AdapterConfig

        cfg = cfg or AdapterConfig.preset("dinov2_vits14")
        model = DinoAdapter(cfg, rngs=nnx.Rngs(args.seed))
        model.eval()
        name = args.preset or args.config or "dinov2_vits14 (random weights)"
    sizes = [_parse_size(s) for s in args.sizes] if args.sizes else SEED_SIZES
    if args.image:
        from jax_adapter.preprocessing import load_image, preprocess

        if not args.sizes:  # the image at its own size
            sizes = [load_image(args.image).shape[:2]]
        street_image = lambda h, w: preprocess(args.image, (h, w), stats=stats or "imagenet")  # noqa: E731
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


def _load_model(name: str, trunk_only: bool = False):
    """``(model, source)``: the model a checkpoint directory, source file or pretrained name /
    URL / ``hf-hub:`` name holds (converted through the cache), and where its weights came from."""
    from jax_adapter import checkpoint
    from jax_adapter.pretrained import cached_checkpoint

    path = name if checkpoint.is_checkpoint(name) else cached_checkpoint(name, trunk_only=trunk_only)
    prov = checkpoint.read_record(path).get("provenance") or {}
    return checkpoint.load_pretrained(path), prov.get("origin") or prov.get("source") or name


def _stats_for(source: str) -> str:
    from jax_adapter.preprocessing import stats_for

    return stats_for(source)


def _auto_size(h: int, w: int, short: int, multiple: int):
    """``(h, w)`` scaled so that the shorter side is about ``short``, rounded to ``multiple``."""
    scale = short / min(h, w)
    return (max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple))


def cmd_show(args) -> int:
    from jax_adapter import viz
    from jax_adapter.preprocessing import load_image, preprocess, to_display

    model, source = _load_model(args.model, trunk_only=args.trunk_only)
    stats = args.stats or _stats_for(source)
    if args.size:
        size = _parse_size(args.size)
    else:
        h, w = load_image(args.image).shape[:2]
        size = _auto_size(h, w, args.short_side, model.cfg.patch_size)
    images = preprocess(args.image, size, mode=args.mode, stats=stats)
    img = viz.render(model, images, to_display(images, stats), tile_height=args.tile_height)
    viz.save_png(img, args.output)
    tiles = json.loads(img.info[viz.PNG_KEY])
    print(json.dumps({"written": args.output, "size": list(img.size), "input": list(size), "stats": stats,
                      "tiles": [t["label"] for t in tiles]}))
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

    c = sub.add_parser("convert", help="convert a DINOv2/DINOv3 trunk or adapter checkpoint (hub .pth, "
                                       "Hugging Face, detector, segmentor) into a checkpoint directory")
    c.add_argument("src", help="a .pth/.bin/.safetensors file or a Hugging Face model folder; or a "
                               "pretrained name (dinov2_vits14, ..., dinov2_vitg14_reg), an http(s):// URL "
                               "or hf-hub:ORG/NAME[@REVISION], fetched through the download cache")
    c.add_argument("dst", help="output checkpoint directory")
    c.add_argument("--config", help="config JSON completing or overriding what the tensors imply: "
                                    "AdapterConfig fields, DINOv2 hub vit_* arguments, a DINOv3 adapter "
                                    "JSON (with \"backbone\") or trunk JSON, or a Hugging Face config.json")
    c.add_argument("--preset", help="a named preset instead of --config, e.g. dinov2_vitb14")
    c.add_argument("--prefix", help="key prefix of the backbone inside a detector checkpoint "
                                    "(detected when there is only one backbone)")
    c.add_argument("--trunk-only", action="store_true",
                   help="write the trunk alone (load_pretrained then returns a DinoV2 or DinoV3)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), help="dtype of the stored arrays")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="write a checkpoint directory as a PyTorch state dict "
                                      "(upstream names: seed DinoAdapter / DINOv2 hub; DINOv3: Meta's)")
    e.add_argument("ckpt", help="checkpoint directory written by convert (or by training)")
    e.add_argument("out", help="output file: .pth, .pt, .bin (torch.save) or .safetensors")
    e.add_argument("--trunk-only", action="store_true",
                   help="export the trunk alone, in its hub's names (DINOv2 hub; DINOv3: Meta's, with "
                        "rope_embed.periods, qkv.bias_mask and mask_token)")
    e.add_argument("--dinov2-only", action="store_true", help="--trunk-only for a DINOv2 checkpoint")
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

    d = sub.add_parser("demo", help="run the backbone on a synthetic image at the seed sizes, with timings",
                       description="Run the backbone (default: ViT-S, random weights) on a synthetic "
                                   "street image at the five seed sizes, printing per-level shapes, "
                                   "compile and run times. About 2 minutes on 2 CPU cores; --sizes "
                                   "256x704 runs one size, --preset tiny a small model.")
    d.add_argument("--preset", help="preset name (default dinov2_vits14, random weights)")
    d.add_argument("--config", help="AdapterConfig JSON")
    d.add_argument("--checkpoint", help="a converted checkpoint directory")
    d.add_argument("--sizes", nargs="+", help="HxW sizes (default: the five seed sizes)")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image", help="an image file to run on instead of the synthetic street picture "
                                   "(at its own size, or resized to each of --sizes)")
    d.add_argument("--stats", choices=("imagenet", "sat"),
                   help="normalisation of --image (default: from the weights' name; imagenet)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("show", help="picture of what the backbone sees: the image beside the PCA "
                                    "(3 components as RGB) of the ViT map and of f1..f4")
    s.add_argument("model", help="a checkpoint directory, a source file, a pretrained name "
                                 "(dinov2_vits14, ...), an http(s):// URL or hf-hub:ORG/NAME[@REV]")
    s.add_argument("image", help="an image file (anything Pillow reads)")
    s.add_argument("-o", "--output", required=True, help="the PNG to write")
    s.add_argument("--size", help="HxW the image is resized to (default: shorter side --short-side, "
                                  "sides multiples of the patch size)")
    s.add_argument("--short-side", type=int, default=448, help="default input size's shorter side")
    s.add_argument("--mode", choices=("resize", "pad"), default="resize",
                   help="resize to --size, or fit inside it keeping the aspect ratio and pad")
    s.add_argument("--stats", choices=("imagenet", "sat"),
                   help="normalisation (default: from the weights' name; sat for DINOv3 SAT493M)")
    s.add_argument("--trunk-only", action="store_true", help="convert a source as the trunk alone "
                                                             "(shows the ViT patch tokens only)")
    s.add_argument("--tile-height", type=int, default=224, help="height of each tile in pixels")
    s.set_defaults(func=cmd_show)

    from jax_adapter.cli.train import add_parser as add_train_parser

    add_train_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "train" and not args.release_memory:
        # The program itself (not a caller's in-process main([...])): start over once with the
        # allocator settings of jax_adapter.memory, which glibc reads only at startup.
        from jax_adapter.memory import reexec_retaining_freed_memory
        reexec_retaining_freed_memory()
    try:
        return args.func(args)
    except (JaxAdapterError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"jax-adapter {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
