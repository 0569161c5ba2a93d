"""``jax-adapter convert``, ``export`` and ``inspect``: weights in, weights out, what a file holds
(a thin layer over :mod:`jax_adapter.convert.pipeline`)."""

from __future__ import annotations

import json


def _output_options(parser, dtype_help: str, overwrite_help: str) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help=dtype_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="convert a DINOv2/DINOv3 trunk or adapter checkpoint (hub .pth, "
                                       "Hugging Face, detector, segmentor) into a checkpoint directory")
    c.add_argument("src", help="a .pth/.bin/.safetensors file or a Hugging Face model folder; or a "
                               "registered weights (dinov2_vitb14.lvd142m, or a model with weights: dinov2_vitb14; "
                               "jax_adapter.list_pretrained()), an http(s):// URL or hf-hub:ORG/NAME[@REVISION], "
                               "fetched through the download cache")
    c.add_argument("dst", help="output checkpoint directory")
    c.add_argument("--config", help="config JSON completing or overriding what the tensors imply: "
                                    "AdapterConfig fields, DINOv2 hub vit_* arguments, a DINOv3 adapter "
                                    "JSON (with \"backbone\") or trunk JSON, or a Hugging Face config.json")
    c.add_argument("--preset", help="a registered model instead of --config, e.g. dinov2_vitb14_adapter "
                                    "(jax_adapter.list_models())")
    c.add_argument("--prefix", help="key prefix of the backbone inside a detector checkpoint "
                                    "(detected when there is only one backbone)")
    c.add_argument("--trunk-only", action="store_true",
                   help="write the trunk alone (load_pretrained then returns a DinoV2 or DinoV3)")
    _output_options(c, "dtype of the stored arrays", "replace an existing destination")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="write a checkpoint directory as a PyTorch state dict "
                                      "(upstream names: seed DinoAdapter / DINOv2 hub; DINOv3: Meta's)")
    e.add_argument("ckpt", help="checkpoint directory written by convert (or by training)")
    e.add_argument("out", help="output file: .pth, .pt, .bin (torch.save) or .safetensors")
    e.add_argument("--trunk-only", action="store_true",
                   help="export the trunk alone, in its hub's names (DINOv2 hub; DINOv3: Meta's, with "
                        "rope_embed.periods, qkv.bias_mask and mask_token)")
    e.add_argument("--dinov2-only", action="store_true", help="--trunk-only for a DINOv2 checkpoint")
    _output_options(e, "dtype of the written tensors (default: as stored)", "replace an existing output file")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="show what a checkpoint (PyTorch or ours) holds: format, variant, "
                                       "parameter count, config")
    i.add_argument("path", help="a checkpoint directory, a .pth/.bin/.safetensors file or a Hugging Face folder")
    i.add_argument("--prefix", help="key prefix of the backbone inside a detector checkpoint")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)



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
