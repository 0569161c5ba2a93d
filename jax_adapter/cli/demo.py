"""``jax-adapter demo`` and ``show``: the backbone run on a picture, with shapes and timings, or
drawn as the PCA of its feature maps."""

from __future__ import annotations

import json
import time

from jax_adapter.cli.common import CliError, model_config, parse_size

SEED_SIZES = ((256, 704), (224, 224), (900, 1600), (480, 640), (300, 500))


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="run the backbone on a synthetic image at the seed sizes, with timings",
                       description="Run the backbone (default: ViT-S, random weights) on a synthetic "
                                   "street image at the five seed sizes, printing per-level shapes, "
                                   "compile and run times. About 2 minutes on 2 CPU cores; --sizes "
                                   "256x704 runs one size, --preset dinov2_tiny_adapter a small model.")
    d.add_argument("--preset", help="an adapter of jax_adapter.list_models() (a trunk name means its "
                                    "adapter; default dinov2_vits14_adapter, random weights)")
    d.add_argument("--config", help="an adapter config JSON")
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
                                 "(dinov2_vitb14.lvd142m, ...), an http(s):// URL or hf-hub:ORG/NAME[@REV]")
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


def cmd_demo(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from jax_adapter import registry
    from jax_adapter.preprocessing import stats_for
    from jax_adapter.training.synthetic import street_image

    stats = args.stats
    if args.checkpoint:
        model, source = _load_model(args.checkpoint)
        stats = stats or stats_for(source)
        name = args.checkpoint
    else:
        # Any adapter (DINOv2 or DINOv3; a trunk name means its adapter), randomly initialised.
        cfg = model_config(args.preset, args.config, default="dinov2_vits14_adapter")
        model = registry.kind_of_config(cfg).model(cfg, rngs=nnx.Rngs(args.seed))
        model.eval()
        name = args.preset or args.config or "dinov2_vits14_adapter (random weights)"
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else SEED_SIZES
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
    """``(model, source)``: the model a checkpoint directory, source file or registered weights /
    URL / ``hf-hub:`` name holds (converted through the cache), and where its weights came from."""
    from jax_adapter import checkpoint
    from jax_adapter.pretrained import cached_checkpoint, load_checkpoint

    path = name if checkpoint.is_checkpoint(name) else cached_checkpoint(name, trunk_only=trunk_only)
    prov = checkpoint.read_record(path).get("provenance") or {}
    return load_checkpoint(path), prov.get("origin") or prov.get("source") or name


def _auto_size(h: int, w: int, short: int, multiple: int):
    """``(h, w)`` scaled so that the shorter side is about ``short``, rounded to ``multiple``."""
    scale = short / min(h, w)
    return (max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple))


def cmd_show(args) -> int:
    from jax_adapter import viz
    from jax_adapter.preprocessing import load_image, preprocess, stats_for, to_display

    model, source = _load_model(args.model, trunk_only=args.trunk_only)
    stats = args.stats or stats_for(source)
    if args.size:
        size = parse_size(args.size)
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
