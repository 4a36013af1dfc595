"""`vlmtune train`, `vlmtune config validate` and `vlmtune export`: training runs and what they produce."""

from __future__ import annotations

import argparse

from vlmtune.cli.model import add_trust_remote_code

OVERRIDES_HELP = "dotted overrides of the config, e.g. train.lr=1e-5 loss.name=dpop train.max_steps=100"


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="SFT, preference training (DPO, DPOP, IPO, hinge, robust, SimPO, RPO, BCO, MPO), KTO on unpaired data, "
        "GRPO, online or iterative DPO, or rejection-sampling fine-tuning of a vision-language model",
        description="Train as the YAML config says, with overrides from the command line. Writes metrics.jsonl, "
        "TensorBoard logs, checkpoints, config.yaml and final/ (adapter + processor) to train.output_dir. "
        "Example: vlmtune train --algo dpo --config configs/demo-cpu.yaml train.lr=1e-4 loss.name=dpop",
    )
    train.add_argument("--algo", choices=("sft", "dpo", "grpo", "kto", "online_dpo", "rft", "iterative_dpo"),
                       default=None, help="overrides train.algo of the config (online_dpo, rft, iterative_dpo: see "
                       "the online: section)")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of output_dir")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    add_trust_remote_code(train)
    train.set_defaults(func=_train)

    config = commands.add_parser("config", help="check training config files")
    sub = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    validate = sub.add_parser("validate", help="check a config against the schema and print it resolved")
    validate.add_argument("config", help="YAML config file")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    validate.set_defaults(func=_validate)

    export = commands.add_parser(
        "export",
        help="merge a run's LoRA adapter into its base model (plain transformers folder)",
        description="Write RUN_DIR's final model to OUT: with --merge the adapter is merged into the base "
        "weights (safetensors + processor, loads with plain transformers); without it the adapter is copied.",
    )
    export.add_argument("run_dir", help="a finished training run (train.output_dir)")
    export.add_argument("out", help="folder to write (new or empty)")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    add_trust_remote_code(export)
    export.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    import sys

    from accelerate import PartialState

    from vlmtune.config import load_config
    from vlmtune.train.loop import TrainingInterrupted, train

    config = load_config(args.config, args.overrides, algo=args.algo)
    try:
        final = train(config, resume=args.resume, trust_remote_code=args.trust_remote_code)
    except TrainingInterrupted as e:
        if PartialState().is_main_process:  # under accelerate launch, once rather than once per process
            print(f"interrupted: saved checkpoint {e}; continue with --resume", file=sys.stderr)
        return 130
    if PartialState().is_main_process:
        print(f"final model: {final}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from vlmtune.config import config_yaml, load_config

    config = load_config(args.config, args.overrides)
    print(config_yaml(config), end="")
    print(f"{args.config}: valid")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlmtune.train.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge, trust_remote_code=args.trust_remote_code)
    print(f"wrote {out}")
    return 0
