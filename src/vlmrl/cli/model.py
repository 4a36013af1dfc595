"""`vlmrl model ...`: build tiny offline models and inspect model folders."""

from __future__ import annotations

import argparse

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def add_commands(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="build tiny offline models and inspect model folders")
    sub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)

    tiny = sub.add_parser(
        "tiny",
        help="write a small random model of a real Qwen-VL architecture, with a locally trained tokenizer",
        description="Write a random model of a real Qwen-VL architecture and its processor to a folder "
        "that every command (and plain transformers) loads like a checkpoint. No network.",
    )
    tiny.add_argument("--family", choices=FAMILIES, required=True)
    tiny.add_argument("--out", required=True, help="folder to write")
    tiny.add_argument("--size", choices=("tiny", "small"), default="tiny", help="tiny ~0.3M params, small ~30M")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)

    info = sub.add_parser("info", help="print a model folder's family, parameter count and image tokens")
    info.add_argument("model", help="model folder or hub id")
    info.add_argument("--image-size", type=int, default=None, help="image side in pixels to count tokens for")
    info.set_defaults(func=_info)


def _tiny(args: argparse.Namespace) -> int:
    from vlmrl.models.tiny import build_tiny

    out = build_tiny(args.family, args.out, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} {args.family} model to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from vlmrl.models.load import family_of, load_model

    model, processor = load_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"family: {family_of(model)}")
    print(f"parameters: {n_params:,}")
    if args.image_size:
        from PIL import Image

        grid = processor.image_processor(images=[Image.new("RGB", (args.image_size, args.image_size))])
        thw = grid["image_grid_thw"][0]
        print(f"image tokens for {args.image_size} px: {int(thw.prod()) // 4} (patch grid {thw.tolist()})")
    return 0
