"""The `minillava` command line: `minillava train ...`, `minillava merge-lora ...` and friends.

Options of `train` are generated from `TrainConfig`'s fields, so the command line and Python take exactly the
same settings with the same defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .train import TrainConfig


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, type=base, default=f.default, help=f"(default: {f.default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minillava", description="LLaVA from the ground up.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train stage 1 (feature alignment) or 2 (visual instruction tuning)")
    _add_dataclass_options(p_train, TrainConfig)
    p_merge = sub.add_parser("merge-lora", help="merge a stage-2 LoRA adapter into a full model folder")
    p_merge.add_argument("adapter")
    p_merge.add_argument("out")
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            from .train import train

            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
            train(cfg)
        elif args.command == "merge-lora":
            from .train import merge_lora

            print(f"merged -> {merge_lora(args.adapter, args.out)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"minillava {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
