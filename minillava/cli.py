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
    p_chat = sub.add_parser("chat", help="chat about images on the terminal (reads stdin line by line)")
    p_chat.add_argument("--model", default="tiny-llava", help="a zoo name or a model folder (default: tiny-llava)")
    p_chat.add_argument("--image", nargs="+", action="extend", default=[], metavar="PATH",
                        help="images for the first question")
    p_chat.add_argument("--max-new-tokens", type=int, default=128)
    p_chat.add_argument("--temperature", type=float, default=0.0)
    p_eval = sub.add_parser("eval", help="evaluate a model on a LLaVA-format question file with reference answers")
    p_eval.add_argument("--model", default="tiny-llava", help="a zoo name or a model folder (default: tiny-llava)")
    p_eval.add_argument("--data", required=True, help="LLaVA-format JSON with reference answers")
    p_eval.add_argument("--images", default=None, help="image folder (default: the JSON file's folder)")
    p_eval.add_argument("--kind", choices=("vqa", "pope", "caption", "multi-image"), default="vqa")
    p_eval.add_argument("--template", default=None, help="render prompts with this template instead of the model's")
    p_eval.add_argument("--short-answer", action="store_true",
                        help="append LLaVA-1.5's 'Answer the question using a single word or phrase.'")
    p_eval.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    p_eval.add_argument("--answers", default=None, help="score these answers (JSON list of {id, turn, answer}) "
                                                       "instead of generating")
    p_eval.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            from .train import train

            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
            train(cfg)
        elif args.command == "merge-lora":
            from .train import merge_lora

            print(f"merged -> {merge_lora(args.adapter, args.out)}")
        elif args.command == "eval":
            from .eval import eval_command

            eval_command(args)
        elif args.command == "chat":
            from .chat import run_cli

            return run_cli(args.model, args.image, args.max_new_tokens, args.temperature)
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, NotADirectoryError, ...
        print(f"minillava {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
