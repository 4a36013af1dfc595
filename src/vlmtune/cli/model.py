"""`vlmtune model ...`: build tiny offline models and inspect model folders."""

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
    tiny.add_argument("--size", choices=("tiny", "small", "2b"), default="tiny",
                      help="tiny ~0.3M params, small ~30M, 2b: Qwen2-VL-2B's real shapes (2.2B, ~9 GB in fp32)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)

    info = sub.add_parser("info", help="print a model folder's family, parameter count and image tokens")
    info.add_argument("model", help="model folder or hub id")
    info.add_argument("--image-size", type=int, default=None, help="image side in pixels to count tokens for")
    add_trust_remote_code(info)
    info.set_defaults(func=_info)


def _tiny(args: argparse.Namespace) -> int:
    from vlmtune.models.tiny import build_tiny

    out = build_tiny(args.family, args.out, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} {args.family} model to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from vlmtune.models.info import model_info

    info = model_info(args.model, image_size=args.image_size, trust_remote_code=args.trust_remote_code)
    print(f"family: {info.family}")
    print(f"parameters: {info.parameters:,}")
    if info.image_tokens is not None:
        print(f"image tokens for {info.image_size} px: {info.image_tokens} (patch grid {list(info.patch_grid)})")
    return 0


def add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: the only way to let a model folder's own Python code run."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a model folder ships (an auto_map in its config); "
                        "only for a folder you trust. No config file can turn this on")


def add_loader(p: argparse.ArgumentParser) -> None:
    """``--loader``: how the model's weights are loaded (``vlmtune.models.load.LOADERS``)."""
    from vlmtune.models.load import LOADERS

    p.add_argument("--loader", choices=LOADERS, default="transformers",
                   help="transformers (default) or unsloth (needs a CUDA device and the unsloth package)")
