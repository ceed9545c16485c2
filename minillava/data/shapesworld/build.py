"""ShapesWorld on disk: `build(out_dir)` (or `python -m minillava.data.shapesworld OUT_DIR`) writes every split
as LLaVA-format JSON and PNG images, with a manifest that lets an identical build be reused."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import time
from pathlib import Path

from ...outputs import atomic_dir
from ...utils import read_json, write_json
from ..records import save_records
from .instructions import generate_records, text_chats
from .scenes import GENERATOR, HELD_OUT, KINDS, SPLITS, Scene, render


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG", compress_level=1)  # no metadata: byte-deterministic
    return buf.getvalue()


def _render_all(scenes: list[Scene]) -> list[bytes]:
    """PNG bytes of every scene, in order; on all the cores this process may use when there are many
    (rendering is pure). Workers start from a fresh interpreter (forkserver), not a fork of one holding torch."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(scenes) // 2000)
    if workers < 2:
        return [_png(s) for s in scenes]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        return list(pool.map(_png, scenes, chunksize=500))


def _code_sha256() -> str:
    """A fingerprint of this module's source: data built by other code is not reused."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):  # the whole generator: scenes, questions, files
        h.update(f.read_bytes())
    return h.hexdigest()


def _arguments(arguments: dict) -> dict:
    """`build`'s arguments as its manifest records them (JSON values; the output folder left out)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items() if k != "out_dir"}


def built_with(out_dir: str | Path, **arguments) -> dict | None:
    """The manifest of the build in out_dir if this version of the module made it with these `build` arguments
    (those not named may be anything), else None."""
    previous = Path(out_dir) / "manifest.json"
    if not previous.is_file():
        return None
    old = read_json(previous, "manifest")
    same = old.get("code_sha256") == _code_sha256() and all(old.get("arguments", {}).get(k) == v
                                                             for k, v in _arguments(arguments).items())
    return old if same else None


def ensure_built(out_dir: str | Path, **kwargs) -> dict:
    """`build(out_dir, **kwargs)`, unless out_dir already holds exactly that build (the same arguments, made by
    the same version of this module); returns the manifest."""
    import inspect

    bound = inspect.signature(build).bind(out_dir, **kwargs)
    bound.apply_defaults()
    return built_with(out_dir, **_arguments(bound.arguments)) or build(out_dir, **kwargs)


def build(out_dir: str | Path, n_train: int = 8000, n_val: int = 500, n_test: int = 1000, n_comp: int = 500,
          n_text: int = 20000, n_text_val: int = 1000, seed: int = 0, image_size: int = 64,
          kinds=KINDS, n_para: int = 500, n_multiturn: int = 300, n_cooccur: int = 500, negatives: bool = True,
          cooccur: float = 0.0, weights: dict | None = None, short_p: float = 0.2,
          more_phrasings: bool = False, reasoned: bool = False, rows: bool = False, value_first: bool = False,
          value_led: bool = False) -> dict:
    """Write every dataset under out_dir, atomically, and return the manifest.

    ``out_dir/images/*.png``, captions_{train,test}.json, instruct_{split}.json for every split of `SPLITS`,
    text_{train,val}.json (LLaVA JSON, images relative to out_dir) and manifest.json (counts, seed, sizes,
    sha256 of each JSON). Byte-identical for the same arguments. An existing out_dir is replaced only if it is
    empty or a previous build (it has a manifest.json); files with no records are not written. `negatives`,
    `cooccur`, `weights` (of the kinds), `short_p` and `more_phrasings` apply to the train split, `reasoned`, `rows`,
    `value_first` and `value_led` to every split (see `generate_records`).
    """
    arguments = _arguments(locals())  # first: exactly the parameters
    out_dir = Path(out_dir)
    previous = out_dir / "manifest.json"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (
            previous.is_file() and read_json(previous, "manifest").get("generator") == GENERATOR):
        raise FileExistsError(f"output folder '{out_dir}': not empty and not a ShapesWorld build; refusing "
                              "to replace it")
    counts = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_comp, "paraphrase": n_para,
              "multiturn": n_multiturn, "cooccur": n_cooccur}
    data = {s: generate_records(s, n, seed, image_size, kinds, out_dir / "images", reasoned=reasoned,
                                rows=rows, value_first=value_first, value_led=value_led,
                                **(dict(negatives=negatives, cooccur=cooccur, weights=weights, short_p=short_p,
                                        more_phrasings=more_phrasings)
                                   if s == "train" else {}))
            for s, n in counts.items()}
    files = {"captions_train.json": data["train"].captions, "captions_test.json": data["test"].captions,
             **{f"instruct_{s}.json": data[s].instruct for s in SPLITS},
             "text_train.json": text_chats(n_text, seed, "train", image_size),
             "text_val.json": text_chats(n_text_val, seed, "val", image_size)}
    manifest = {"generator": GENERATOR, "code_sha256": _code_sha256(), "arguments": arguments, "seed": seed,
                "image_size": image_size,
                "kinds": list(kinds), "held_out": [list(p) for p in HELD_OUT], "splits": counts,
                "images": sum(len(d.scenes) for d in data.values()), "files": {}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        images_sha = hashlib.sha256()
        named = [(name, scene) for d in data.values() for name, scene in d.scenes.items()]
        for name, png in zip((n for n, _ in named), _render_all([s for _, s in named])):
            (tmp / "images" / name).write_bytes(png)
            images_sha.update(name.encode() + png)
        manifest["images_sha256"] = images_sha.hexdigest()  # over (name, bytes) of every image, in order
        for fname, records in files.items():
            if records:
                save_records(records, tmp / fname, image_dir=out_dir)
                manifest["files"][fname] = {"records": len(records), "sha256": _sha256(tmp / fname)}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    """Command line: python -m minillava.data.shapesworld OUT_DIR [--n-train N ...] [--seed S]."""
    p = argparse.ArgumentParser(prog="python -m minillava.data.shapesworld",
                                description="Build the ShapesWorld datasets (LLaVA JSON + PNG images).")
    p.add_argument("out_dir", help="the folder to write (refused if it holds files another program wrote)")
    for name, default, what in (
            ("n-train", 8000, "training scenes (captions and instructions for both stages)"),
            ("n-val", 500, "validation scenes"), ("n-test", 1000, "test scenes"),
            ("n-comp", 500, "compositional scenes: the held-out colour/shape pairs"),
            ("n-text", 20000, "text-only chats for training (scenes told in words)"),
            ("n-text-val", 1000, "text-only chats for validation"),
            ("n-para", 500, "paraphrase scenes: test scenes asked with held-out phrasings"),
            ("n-multiturn", 300, "multi-turn scenes: one question asked first, fifth, fifth with a late image"),
            ("n-cooccur", 500, "test scenes with the co-occurrence bias (POPE)"),
            ("seed", 0, "the seed of every split"),
            ("image-size", 64, "image side in pixels")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: {default})")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="instruction kinds to generate (default: all)")
    p.add_argument("--reasoned", action="store_true",
                   help="answer named comparisons step by step, each object's size or place first")
    p.add_argument("--rows", action="store_true", help="with --reasoned: a place said by its row or column")
    p.add_argument("--value-first", action="store_true",
                   help="with --reasoned: the winner's value said before it is named ('so the large one, the circle, "
                        "is bigger')")
    p.add_argument("--value-led", action="store_true",
                   help="with --reasoned: each value said before its object ('the large one is the circle')")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = build(a.out_dir, a.n_train, a.n_val, a.n_test, a.n_comp, a.n_text, a.n_text_val, a.seed,
                         a.image_size, tuple(a.kinds), a.n_para, a.n_multiturn, a.n_cooccur, reasoned=a.reasoned,
                         rows=a.rows, value_first=a.value_first, value_led=a.value_led)
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        p.error(str(e))
    for fname, info in manifest["files"].items():
        print(f"{fname:32s} {info['records']:7d} records")
    print(f"{manifest['images']} images in {a.out_dir}/images, {time.perf_counter() - t0:.1f} s")
    return manifest

