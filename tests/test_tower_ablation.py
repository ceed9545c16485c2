"""Training the vision tower on varied pictures (chapter 10.2): the varied renderings, the probes, the tool and its
shipped result."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import load, zoo
from minillava.data import shapesworld as sw
from minillava.data.records import load_records
from minillava.tools.tower_ablation import _features, _probe, probes, varied, varied_records, weights_digest
from minillava.tools.tower_ablation import main as tower_ablation


def test_varied_scenes_keep_what_the_answers_say_and_widen_the_rest():
    rng = np.random.default_rng(0)
    turned = []
    for _ in range(60):
        scene = sw.sample_scene(rng)
        v = varied(scene, np.random.default_rng(int(rng.integers(1 << 30))))
        for o, p in zip(scene.objects, v.objects, strict=True):
            assert (p.shape, p.color, p.size, p.cell) == (o.shape, o.color, o.size, o.cell)
            assert np.abs(np.array(p.rgb) - sw.COLORS[o.color]).max() <= 25
            turned += [p.angle] if p.shape != "circle" else []
        img = np.asarray(sw.render(v), dtype=int)
        for o in v.objects:
            if o.shape in ("circle", "square"):  # the cell's centre shows the object's own shade
                y, x = int((o.cell[0] + 0.5) * 64 / 3), int((o.cell[1] + 0.5) * 64 / 3)
                assert np.abs(img[y, x] - np.array(o.rgb)).max() <= 12, (o, img[y, x])
    assert np.mean([15 < a < 345 for a in turned]) > 0.8  # ShapesWorld's own jitter stays within 15 degrees
    scene = sw.sample_scene(np.random.default_rng(1))
    assert varied(scene, np.random.default_rng(2)) == varied(scene, np.random.default_rng(2))


def test_varied_records_rerender_about_half_of_the_single_image_ones(tmp_path):
    sw.build(tmp_path / "w", n_train=60, n_val=0, n_test=0, n_comp=0, n_para=0, n_multiturn=0, n_cooccur=0,
             n_text=10, n_text_val=0, seed=0)
    records = load_records(tmp_path / "w" / "instruct_train.json") + load_records(
        tmp_path / "w" / "text_train.json", check_files=False)
    out = varied_records(records, tmp_path / "varied", seed=3)
    assert [r.messages for r in out] == [r.messages for r in records]
    changed = [(a, b) for a, b in zip(records, out, strict=True) if b.meta.get("varied")]
    assert 15 <= len(changed) <= 45 and all(len(a.images) == 1 for a, _ in changed)
    for a, b in changed:
        assert b.images[0].parent == tmp_path / "varied" and b.images[0].is_file()
        before, after = (np.asarray(Image.open(r.images[0]), dtype=int) for r in (a, b))
        assert before.shape == after.shape and np.abs(before - after).mean() > 3  # redrawn, not copied
    assert all(b is a for a, b in zip(records, out, strict=True) if not b.meta.get("varied"))
    again = varied_records(records, tmp_path / "again", seed=3)  # the same seed: the same pictures
    assert [r.meta.get("varied") for r in again] == [r.meta.get("varied") for r in out]
    assert all(np.array_equal(np.asarray(Image.open(x.images[0])), np.asarray(Image.open(y.images[0])))
               for x, y in zip(again, out, strict=True) if x.meta.get("varied"))


def test_a_probe_reads_shapes_from_the_shipped_tower_and_not_from_shuffled_labels():
    model, processor = load("tiny-llava")
    result = probes(model, processor, n_train=400, n_test=200)
    assert set(result) == {"shape", "color", "size"}
    assert all(set(r) == {"rendered", "transfer", "redrawn", "varied"} for r in result.values())
    assert all(0 <= v <= 1 for r in result.values() for v in r.values())
    assert result["shape"]["rendered"] > 0.5 and result["color"]["rendered"] > 0.5  # chance: 1/4 and 1/6
    rng = np.random.default_rng(0)
    scenes = [sw.sample_scene(rng) for _ in range(600)]
    x = _features(model, processor, [sw.render(s) for s in scenes])
    y = torch.tensor([sw.SHAPES.index(s.objects[0].shape) for s in scenes])
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert _probe(x[:400], shuffled[:400], x[400:], y[400:]) < 0.4  # nothing to read: about chance


def test_the_tool_trains_three_arms_keeps_what_it_measured_and_refuses_bad_sizes(tmp_path, capsys):
    sw.build(tmp_path / "w", n_train=6, n_val=0, n_test=3, n_comp=0, n_para=0, n_multiturn=0, n_cooccur=0,
             n_text=0, n_text_val=0, seed=0)
    out = tmp_path / "result.json"
    args = ["--data", str(tmp_path / "w" / "instruct_train.json"), "--test", str(tmp_path / "w" / "instruct_test.json"),
            "--arms", str(tmp_path / "arms"), "--steps", "2", "--batch-size", "2", "--n-eval", "2", "--n-probe", "20",
            "--out", str(out)]
    tower_ablation(args)
    result = json.loads(out.read_text())
    assert set(result["arms"]) == {"before", "control", "frozen", "tower"} and result["records"] == 4
    assert all(set(m) == {"test", "varied", "redrawn", "probes"} for m in result["arms"].values())
    assert set(result["train_seconds"]) == {"control", "frozen", "tower"} and (tmp_path / "result.png").is_file()
    assert result["before_sha256"] == weights_digest("tiny-llava") and result["n_eval_records"] == 2
    assert result["kept"] == []
    control, _ = load(tmp_path / "arms" / "control")
    frozen, _ = load(tmp_path / "arms" / "frozen")
    tower, _ = load(tmp_path / "arms" / "tower")
    before, _ = load("tiny-llava")
    same = [torch.equal(a, b) for a, b in zip(before.vision_tower.parameters(), frozen.vision_tower.parameters())]
    moved = [torch.equal(a, b) for a, b in zip(before.vision_tower.parameters(), tower.vision_tower.parameters())]
    assert all(same) and not all(moved)  # (the first step's rate is 0: warmup)
    plain = load_records(tmp_path / "arms" / "mix_plain.json")  # the control: the same records, pictures unvaried
    assert [r.images for r in plain] == [r.images for r in load_records(tmp_path / "w" / "instruct_train.json")][:4]
    assert not all(torch.equal(a, b) for a, b in zip(control.language_model.parameters(),
                                                     frozen.language_model.parameters()))
    assert "redrawn" in capsys.readouterr().out
    again = tower_ablation(args)  # the arms are there: measured again, not retrained, their times kept
    assert again["train_seconds"] == result["train_seconds"] and all(s > 0 for s in again["train_seconds"].values())
    assert again["arms"]["tower"]["test"] == result["arms"]["tower"]["test"]
    shutil.rmtree(tmp_path / "arms" / "frozen")  # its folder gone, its measurement in --out: kept, if asked
    kept = tower_ablation([*args, "--keep-measured"])
    assert kept["kept"] == ["frozen"] and kept["arms"]["frozen"] == result["arms"]["frozen"]
    assert not (tmp_path / "arms" / "frozen").exists() and "kept as measured" in capsys.readouterr().out
    sw.build(tmp_path / "w2", n_train=0, n_val=0, n_test=3, n_comp=0, n_para=0, n_multiturn=0, n_cooccur=0,
             n_text=0, n_text_val=0, seed=1)  # other test records, as many
    other = [*args[:3], str(tmp_path / "w2" / "instruct_test.json"), *args[4:], "--keep-measured"]
    assert tower_ablation(other)["kept"] == [] and (tmp_path / "arms" / "frozen").is_dir()  # trained again
    assert "other settings (test_sha256): nothing kept" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"arm 'control' in .*control: trained otherwise .* remove the folder"):
        tower_ablation([*args[:-2], "--lr", "1e-4", "--out", str(tmp_path / "other.json")])  # other settings
    (tmp_path / "arms" / "tower" / "arm.json").unlink()  # a folder with no record of how it was trained
    with pytest.raises(SystemExit, match=r"arm 'tower' in .*tower: trained by an unknown run"):
        tower_ablation(args)
    with pytest.raises(SystemExit, match="--n-probe: must be at least 2, got 1"):
        tower_ablation(["--data", "x.json", "--n-probe", "1"])


def test_the_shipped_tower_ablation_started_from_the_shipped_tiny_llava():
    """data/results/tower_ablation.json (chapter 10.2) was measured from today's tiny-llava; a rebuilt zoo needs
    the tool run again (its command is in the file)."""
    saved = json.loads((zoo.data_dir() / "results" / "tower_ablation.json").read_text())
    assert saved["before_sha256"] == weights_digest("tiny-llava"), "measured from other weights"
    assert saved["command"].startswith("python -m minillava.tools.tower_ablation")
    for arm in ("before", "control", "frozen", "tower"):
        m = saved["arms"][arm]
        assert all(m[k]["n"] > 0 and 0 <= m[k]["overall"] <= 1 for k in ("test", "varied", "redrawn"))
        assert set(m["probes"]) == {"shape", "color", "size"}
