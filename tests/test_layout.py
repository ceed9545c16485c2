"""The package's shape: what imports what, one loader for every kind of folder, one public API."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_processor, random_image

import minillava as ml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minillava"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The minillava modules a file imports, at the top or inside functions, resolved to full names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minillava")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("minillava"):
                continue
            for a in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return found - {name}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def closure(start: str, graph: dict) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycles():
    """No module reaches itself through its imports (a package's __init__ re-exporting its modules aside)."""
    graph = {m: {d for d in deps if not (is_package_init(d) and m.startswith(d + "."))} for m, deps in GRAPH.items()}
    cycles = [m for m in graph if m in closure(m, graph) and not is_package_init(m)]
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_the_library_never_imports_the_tooling():
    tooling = {m for m in MODULES if m.startswith("minillava.tools")}
    assert tooling, "the maintainer tooling lives in minillava/tools"
    library = {m for m in MODULES if not m.startswith(("minillava.tools", "minillava.cli", "minillava.__main__"))}
    offenders = {m: sorted(GRAPH[m] & tooling) for m in library if GRAPH[m] & tooling}
    assert not offenders, f"library modules importing tooling: {offenders}"
    assert GRAPH["minillava.cli"] & tooling == {"minillava.tools.bench"}  # `minillava bench` only


def test_the_decoding_machinery_is_not_in_the_model():
    source = (PACKAGE / "model.py").read_text()
    assert "StaticCache" not in source and not re.search(r"torch\.compile\(", source)
    longest = max(len(ast.get_source_segment(source, f).splitlines()) for f in ast.walk(ast.parse(source))
                  if isinstance(f, ast.FunctionDef))
    assert longest <= 60, f"model.py's longest function has {longest} lines"


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("chapter", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_chapters_import_neither_tooling_nor_private_names(chapter):
    code = notebook_code(chapter)
    names = r"(tools|bench|build_zoo|ablations)\b"
    tooling = rf"minillava\.{names}|from minillava import [^\n]*\b{names}"
    assert not re.search(tooling, code), f"{chapter.name} imports tooling"
    private = re.findall(r"\b[A-Za-z]\w*(?:\.\w+)*\._[a-z]\w*", code)  # any `name._private` (dunders aside)
    private += re.findall(r"from minillava[\w.]* import [^\n]*\b_[a-z]\w*", code)
    assert not private, f"{chapter.name} uses private names: {private}"


def test_all_dir_and_the_api_page_agree():
    """What `import minillava` shows is `__all__` (in a fresh interpreter: importing the command line or the
    tooling later adds them as attributes, as Python does for any submodule), and the API page documents it."""
    shown = subprocess.run([sys.executable, "-c", "import minillava as ml; print(' '.join(dir(ml)))"],
                           capture_output=True, text=True, check=True).stdout.split()
    public = {n for n in shown if not n.startswith("_")}
    assert public == set(ml.__all__), (sorted(public - set(ml.__all__)), sorted(set(ml.__all__) - public))
    page = (ROOT / "book" / "api.md").read_text()
    missing = [n for n in ml.__all__ if not re.search(rf"\b{re.escape(n)}\b", page)]
    assert not missing, f"book/api.md does not document {missing}"
    assert callable(ml.train) and ml.train.__module__ == "minillava.training.loop"  # the function, not a module
    assert ml.evaluation.score and ml.training.TrainConfig is ml.TrainConfig


def test_load_takes_every_kind_of_folder(tmp_path, tokenizer):
    """One loader: a zoo name, a minillava folder, a stage-1 output, a LoRA output and a transformers Llava folder
    all give (LlavaModel, Processor) that answer the same prompt with the weights they hold."""
    from transformers import LlavaForConditionalGeneration

    model = make_model(tokenizer)
    processor = make_processor(tokenizer, model)
    batch = processor([{"role": "user", "content": "<image>\nWhat?"}], [random_image()], add_generation_prompt=True)
    with torch.no_grad():
        want = model(**batch).logits
    ml.save(model, processor, tmp_path / "native")
    ml.export_hf(model, processor, tmp_path / "exported")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exported")
    hf.save_pretrained(tmp_path / "hf")  # a folder transformers itself wrote
    for folder in ("exported", "hf"):
        for f in (tmp_path / "exported").iterdir():
            if "token" in f.name or "processor" in f.name or "chat_template" in f.name:
                (tmp_path / folder / f.name).write_bytes(f.read_bytes())
    for folder in ("native", "exported", "hf"):
        loaded, proc = ml.load(tmp_path / folder, device="cpu")
        assert isinstance(loaded, ml.LlavaModel) and isinstance(proc, ml.Processor)
        with torch.no_grad():
            got = loaded(**proc([{"role": "user", "content": "<image>\nWhat?"}], [random_image()],
                                add_generation_prompt=True)).logits
        assert (got - want).abs().max() <= 1e-5, folder
    stage1, proc = ml.load(ml.zoo.path("tiny-llava-stage1"))  # a stage-1 folder by path, and the zoo by name
    named, _ = ml.load("tiny-llava-stage1")
    assert proc.template.name == "plain" and not stage1.training
    assert torch.equal(stage1.projector[0].weight, named.projector[0].weight)


def test_every_train_option_explains_itself(capsys):
    from minillava.cli import parser

    train = next(a for a in parser()._actions if a.dest == "command").choices["train"]
    undocumented = [a.option_strings[0] for a in train._actions if a.option_strings and not a.help]
    assert not undocumented, f"train options without help: {undocumented}"
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: )" not in text and "a LLaVA-format JSON file" in text and "(default: 16)" in text
