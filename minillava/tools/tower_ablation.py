"""When training the vision tower pays: tiny-llava on pictures its frozen tower never saw, tower frozen or trained.

tiny-clip saw only ShapesWorld's renderer, whose shapes turn at most 15 degrees, on pale backgrounds, in shades
within 8 levels of their named colour. On pictures painted by other code (`minillava.tools.redrawn`) tiny-llava
answers far worse than on the test split. Two questions, measured here:

1. How much of what the answers need can a linear read-out find in the tower's features? A probe (logistic
   regression on the feature layer's flattened patch features, trained on `--n-probe` pictures, scored on half as
   many others) reads the first object's (the top-left-most's) shape, colour and size: from ShapesWorld's
   pictures, from `varied` ones and from redrawn ones, and trained on ShapesWorld's, from redrawn ones.
2. Does training on more varied pictures help, and does it need the tower to train? From tiny-llava, three arms
   train on the first `--steps` x `--batch-size` records of `--data` for the same steps with the same seed. Arm
   "control" trains on them as they are (projector and language model, as LLaVA-1.5 does): what training again
   at all changes. The other two see each single-picture record's picture re-rendered with probability 1/2 by
   ShapesWorld's own renderer with wider jitter (`varied`: any rotation, shades up to 25 levels off, darker and
   more saturated backgrounds with more noise and a wider gradient), the rest as they were: arm "frozen" trains
   what the control does; arm "tower" trains the tower too, at a fifth of the rate (`vision_lr`, OneVision's
   ratio). Each arm, and the start, answers the test records' questions on ShapesWorld's pictures, on varied
   ones and on redrawn ones.

The redrawn pictures still differ from anything trained on: shapes off-centre in their cell and of varying size,
other proportions, outlines, aliased edges, two-tone backgrounds, other image sizes (`python -m
minillava.tools.redrawn --factors` measures which of these costs what). Arms already in `--arms` are measured
again, not retrained, if they were trained as this run asks (`arm.json`). With `--keep-measured`, an arm whose
folder is gone but which `--out` measured with the same settings (the start's weights, the training and test
records by digest, steps, rates, seed and sizes) is kept as measured there, provided the start answers exactly as it
did then. Run (about 90 minutes on 2 CPU cores, 65 of them training; `make tower-ablation` builds the records
first, the round's with `python -m minillava.tools.build_zoo --natural-data 9` and the test split's, as `make zoo`
builds it, into a folder of its own):

    python -m minillava.tools.tower_ablation --data build/shapesworld-natural9/mix_natural.json \
        --test build/shapesworld-test/instruct_test.json --steps 600 --out data/results/tower_ablation.json
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..data import shapesworld as sw
from ..data.records import Record, load_records, save_records
from ..utils import atomic_file, read_json, write_json
from ..zoo import weights_digest
from .negatives import train_arms
from .redrawn import evaluate as evaluate_redrawn
from .redrawn import redraw, shade

PROBED = ("shape", "color", "size")
ARMS = ("control", "frozen", "tower")  # the trained arms (and "before", their start)


def varied(scene: sw.Scene, rng: np.random.Generator) -> sw.Scene:
    """The scene with ShapesWorld's jitter widened: shapes at any angle, shades up to 25 levels off their named
    colour, a background of any hue that may be darker and more saturated (the renderer, geometry and size stay)."""
    objs = tuple(dataclasses.replace(o, rgb=shade(o.color, rng), angle=0.0 if o.shape == "circle" else
                                     round(float(rng.uniform(0, 360)), 1)) for o in scene.objects)
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.65, 1.0))
    c0 = tuple(int(round(255 * x)) for x in rgb)
    c1 = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in c0)
    bg = sw.Background(c0, c1, int(rng.integers(360)), int(rng.integers(2**31)), float(rng.uniform(0, 6)))
    return sw.Scene(objs, bg, scene.size)


def vary(scene: sw.Scene, rng: np.random.Generator):
    """The scene `varied`, drawn by ShapesWorld's renderer."""
    return sw.render(varied(scene, rng))


def varied_records(records: list[Record], folder: Path, p: float = 0.5, seed: int = 0) -> list[Record]:
    """The records with the picture of each single-image one re-rendered `varied` with probability `p`, saved
    into `folder`; other records (text-only, two images) as they are."""
    rng, out = np.random.default_rng(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        if len(r.images) == 1 and isinstance(r.meta.get("scene"), dict) and rng.random() < p:
            path = folder / f"{r.id}.png"
            vary(sw.Scene.from_dict(r.meta["scene"]), rng).save(path)
            r = Record(r.id, [path], r.messages, {**r.meta, "varied": True})
        out.append(r)
    return out


def pictures(path: str | Path, n: int = 5, seed: int = 0) -> None:
    """A PNG of `n` scenes as ShapesWorld renders them, `varied` and `redraw`n (a row each), for the book."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    scenes = [sw.sample_scene(rng) for _ in range(n)]
    rows = {"ShapesWorld's renderer (what tiny-clip saw)": [sw.render(s) for s in scenes],
            "varied (half of the arms' training pictures)": [vary(s, rng) for s in scenes],
            "redrawn by other code (the check)": [redraw(s, rng) for s in scenes]}
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.4))
    for row, (title, images) in zip(axes, rows.items()):
        for ax, img in zip(row, images):
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_title(title, loc="left", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=72)
    plt.close(fig)


def _features(model, processor, images) -> torch.Tensor:
    """(N, patches * width): the tower's feature-layer output, flattened."""
    with torch.no_grad():
        return torch.cat([model.encode_images(processor.image_processor(images[i:i + 256])).flatten(1)
                          for i in range(0, len(images), 256)])


def _probe(x_train, y_train, x_test, y_test, steps: int = 300) -> float:
    """Accuracy of a logistic regression on standardised features (Adam, full batch, light weight decay)."""
    torch.manual_seed(0)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-4
    head = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head((x_train - mu) / sd), y_train).backward()
        opt.step()
    with torch.no_grad():
        return float((head((x_test - mu) / sd).argmax(1) == y_test).float().mean())


def probes(model, processor, n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> dict:
    """Linear probes of the first object's shape, colour and size from the tower's features: trained and scored
    on ShapesWorld renders ("rendered"), trained on renders and scored on redrawn pictures ("transfer"), trained
    and scored on redrawn pictures ("redrawn": is it in the features at all), and on `varied` ones ("varied")."""
    rng = np.random.default_rng(seed)
    scenes = [sw.sample_scene(rng, exclude=()) for _ in range(n_train + n_test)]
    labels = {"shape": [sw.SHAPES.index(s.objects[0].shape) for s in scenes],
              "color": [list(sw.COLORS).index(s.objects[0].color) for s in scenes],
              "size": [list(sw.SIZES).index(s.objects[0].size) for s in scenes]}
    rendered = _features(model, processor, [sw.render(s) for s in scenes])
    redrawn = _features(model, processor, [redraw(s, rng) for s in scenes])
    turned = _features(model, processor, [vary(s, rng) for s in scenes])
    tr, te = slice(0, n_train), slice(n_train, None)
    out = {}
    for k in PROBED:
        y = torch.tensor(labels[k])
        out[k] = {"rendered": _probe(rendered[tr], y[tr], rendered[te], y[te]),
                  "transfer": _probe(rendered[tr], y[tr], redrawn[te], y[te]),
                  "redrawn": _probe(redrawn[tr], y[tr], redrawn[te], y[te]),
                  "varied": _probe(turned[tr], y[tr], turned[te], y[te])}
    return out


def records_digest(records: list[Record]) -> str:
    """The first 16 hex digits of the sha256 of the records' ids, messages and image names: which records."""
    key = [(r.id, r.messages, [Path(i).name for i in r.images]) for r in records]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def measure(model_dir, test: list[Record], n_probe: int = 2000, progress: bool = True) -> dict:
    """VQA exact match on the test records' pictures, on the same scenes `varied` (as half the arms' training
    pictures were) and redrawn, and the tower's probes (trained on `n_probe` pictures, scored on half as many)."""
    from ..checkpoints import load

    model, processor = load(model_dir, dtype=torch.float32)
    model.eval()
    summary = lambda r: {"overall": r["overall"]["exact"], "n": r["overall"]["n"],  # noqa: E731
                         "by_type": {k: v["exact"] for k, v in r["by_type"].items()}}
    return {"test": summary(sw.evaluate(model, processor, test, "vqa", progress=progress)),
            "varied": summary(evaluate_redrawn(model, processor, test, seed=1, draw=vary, progress=progress)),
            "redrawn": summary(evaluate_redrawn(model, processor, test, progress=progress)),
            "probes": probes(model, processor, n_probe, n_probe // 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.tower_ablation", description=__doc__.splitlines()[0])
    p.add_argument("--before", default="tiny-llava", help="the arms' start")
    p.add_argument("--data", required=True, help="training records with ShapesWorld scenes (a natural-use round's)")
    p.add_argument("--test", default="build/shapesworld/instruct_test.json", help="ShapesWorld test records")
    p.add_argument("--arms", default="build/tower_ablation", help="where the arms and their pictures go")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each arm")
    p.add_argument("--batch-size", type=int, default=32, help="as the natural-use rounds")
    p.add_argument("--lr", type=float, default=3e-4, help="as the natural-use rounds")
    p.add_argument("--vision-ratio", type=float, default=0.2, help="the tower's rate over the rest's (OneVision: 1/5)")
    p.add_argument("--n-eval", type=int, default=500, help="test records measured")
    p.add_argument("--n-probe", type=int, default=2000, help="pictures each probe trains on (scored on half as many)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/results/tower_ablation.json")
    p.add_argument("--device", default=None)
    p.add_argument("--keep-measured", action="store_true",
                   help="keep the arms that --out measured with the same settings and whose folders are gone")
    a = p.parse_args(argv)
    for name, value, least in (("steps", a.steps, 1), ("n-eval", a.n_eval, 1), ("n-probe", a.n_probe, 2)):
        if value < least:
            raise SystemExit(f"--{name}: must be at least {least}, got {value}")
    a.arms = arms = Path(a.arms).resolve()  # the mix names its pictures relative to itself
    records = load_records(Path(a.data).resolve())[: a.steps * a.batch_size]
    mix = varied_records(records, arms / "images", seed=a.seed)
    path, plain = arms / "mix_varied.json", arms / "mix_plain.json"
    save_records(mix, path, image_dir=path.parent)
    save_records(records, plain, image_dir=plain.parent)
    test = load_records(a.test)[: a.n_eval]
    settings = {"before_sha256": weights_digest(a.before), "data_sha256": records_digest(records),
                "test_sha256": records_digest(test), "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                "vision_lr": a.lr * a.vision_ratio, "seed": a.seed, "records": len(mix),
                "varied": sum(bool(r.meta.get("varied")) for r in mix), "n_eval_records": len(test),
                "n_probe": a.n_probe}
    earlier = read_json(a.out, what="results file") if a.keep_measured and Path(a.out).is_file() else {}
    if differs := [k for k, v in settings.items() if earlier and earlier.get(k) != v]:
        print(f"--keep-measured: {a.out} was measured with other settings ({', '.join(differs)}): nothing kept")
    keep = [arm for arm in ARMS if earlier and not differs and arm in earlier.get("arms", {})
            and not (arms / arm / "model.safetensors").is_file()]
    if keep:
        print(f"kept as measured in {a.out} (the same settings; their folders are gone): {', '.join(keep)}")
    seconds = train_arms(a, {"control": (plain, {}), "frozen": (path, {}),
                             "tower": (path, {"vision_lr": a.lr * a.vision_ratio})}, keep)
    measured = {arm: measure(src, test, a.n_probe) for arm, src in (("before", a.before),
                                                                     *((arm, arms / arm) for arm in ARMS))
                if arm not in keep}
    if keep and measured["before"] != earlier["arms"]["before"]:
        raise SystemExit(f"--keep-measured: the start answers otherwise than when {a.out} was measured, so its kept "
                         "arms would not compare with this run's; run without --keep-measured")
    result = {**settings, "train_seconds": seconds, "kept": keep,
              "arms": {arm: measured.get(arm) or earlier["arms"][arm] for arm in ("before", *ARMS)},
              "command": "python -m minillava.tools.tower_ablation " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(a.out, result)
    pictures(Path(a.out).with_suffix(".png"))
    for arm, m in result["arms"].items():
        print(f"{arm:7s} test {m['test']['overall']:.1%}  redrawn {m['redrawn']['overall']:.1%}  shape probe on "
              f"redrawn {m['probes']['shape']['redrawn']:.1%}")
    return result


if __name__ == "__main__":
    main()
