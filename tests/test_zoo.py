"""The zoo: the whole rebuild pipeline at toy size, loading what it wrote, and clear errors when files are missing."""

import hashlib
import json

import numpy as np
import pytest
import torch

import minillava as ml
from minillava import zoo
from minillava.data import shapesworld as sw
from minillava.data.records import load_records
from minillava.tools import build_zoo
from minillava.utils import pick_device


@pytest.fixture(scope="module")
def toy_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    summary = build_zoo.build(root / "data", build_zoo.TOY, root / "work", progress=False)
    return root / "data", summary


def clip_color_accuracy(folder, n: int) -> float:
    """tiny-clip's zero-shot colour accuracy counted here: the most probable colour of each of the `n`
    single-object scenes its card measures (seed 1234) against the colour of its object."""
    from transformers import AutoTokenizer, CLIPModel

    from minillava import pretrain
    from minillava.data import shapesworld as sw

    clip, tok = CLIPModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    size, rng = clip.config.vision_config.image_size, np.random.default_rng(1234)
    scenes = [sw.sample_scene(rng, n_objects=1, image_size=size) for _ in range(n)]
    pixels = pretrain.render_pixels([sw.render(s) for s in scenes], size)
    probs = pretrain.zero_shot_probs(clip, tok, pixels, sw.object_prompts("color", sw.COLORS))
    colours = list(sw.COLORS)
    return sum(colours[k] == s.objects[0].color for k, s in zip(probs.argmax(-1).tolist(), scenes)) / n


def lm_perplexity(folder, records) -> float:
    """exp(mean negative log-likelihood) of every next token of the chats, each chat alone (no padding)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm, tok = LlamaForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in (ml.get_template("vicuna_v1").render(r.messages) for r in records):
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = lm(input_ids=ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return float(np.exp(nll / count))


def assert_scores_the_questions(scores: dict, records) -> None:
    """`scores` (overall and by_type: n, exact, contains) are of every answer turn of `records`: per question
    type, n is how many turns have it, exact and contains count whole turns, an exact answer also contains the
    reference, and overall is the mean over all turns."""
    from collections import Counter

    turns = Counter(t for r in records for t in r.meta["qtypes"][:sum(m["role"] == "assistant" for m in r.messages)])
    assert {t: s["n"] for t, s in scores["by_type"].items()} == dict(turns)
    n = scores["overall"]["n"]
    assert n == sum(turns.values()) > 0
    for s in [*scores["by_type"].values(), scores["overall"]]:
        for key in ("exact", "contains"):
            assert s[key] * s["n"] == pytest.approx(round(s[key] * s["n"]), abs=1e-9), (key, s)
        assert s["exact"] <= s["contains"]
    for key in ("exact", "contains"):
        assert scores["overall"][key] == pytest.approx(sum(s["n"] * s[key] for s in scores["by_type"].values()) / n)


@pytest.mark.slow
def test_toy_build_writes_every_component_with_a_card(toy_zoo):
    data, summary = toy_zoo
    for name in zoo.TINY:
        card = (data / name / "README.md").read_text()
        assert card.startswith(f"# {name}") and "## Metrics" in card
        assert json.loads((data / name / "metrics.json").read_text())
        assert not list((data / name).glob("*.bin")) and not list((data / name).glob("*.pt"))
    assert set(summary["seconds"]) == {"data", *zoo.TINY, "total"}
    assert summary["hardware"] == dict.fromkeys(zoo.TINY, build_zoo.hardware(pick_device()))
    work = data.parent / "work"
    clip = summary["tiny-clip"]
    assert clip["zero_shot_color_acc"] == clip_color_accuracy(data / "tiny-clip", clip["n_single_object_images"])
    assert summary["tiny-lm"]["perplexity_text_val"] == pytest.approx(
        lm_perplexity(data / "tiny-lm", load_records(work / "text_val.json", check_files=False)), rel=1e-4)
    lm_card = json.loads((data / "tiny-lm" / "metrics.json").read_text())
    assert lm_card["text_qa_val"] == summary["tiny-lm"]["text_qa_val"]  # the LM's reasoning, before any image
    told = [r for r in load_records(work / "text_val.json", check_files=False) if r.meta["kind"] == "text"]
    assert_scores_the_questions(lm_card["text_qa_val"], told[:build_zoo.TOY.n_eval])  # scenes told in words
    assert "fact" not in lm_card["text_qa_val"]["by_type"]
    assert "### text_qa_val" in (data / "tiny-lm" / "README.md").read_text()
    kinds = set(build_zoo.EVALUATIONS) - {"clip_zero_shot", "stage1_caption_test", "lm_text_qa_val"}
    assert set(summary["tiny-llava"]) == kinds | {"final_train_loss"}
    assert set(summary["tiny-llava"]["pope_test"]["pope"]) == {"random", "popular", "adversarial"}
    metrics = json.loads((data / "tiny-llava" / "metrics.json").read_text())
    assert kinds < set(metrics) and "final_train_loss" in metrics  # training facts kept, measurements added
    card = (data / "tiny-llava" / "README.md").read_text()
    assert "### vqa_test" in card and "| **overall** |" in card and "final_train_loss" in card
    assert "### pope_test" in card and "| adversarial |" in card
    assert "caption_test" in json.loads((data / "tiny-llava-stage1" / "metrics.json").read_text())


@pytest.mark.slow
def test_stage2_later_rounds_each_see_only_new_scenes(toy_zoo):
    data, _ = toy_zoo
    work, toy = data.parent / "work", build_zoo.TOY
    ids = lambda name: [r["id"] for r in json.loads((work / f"{name}.json").read_text())]  # noqa: E731
    scenes = lambda lo, hi: [f"train-{i:06d}" for i in range(lo, hi)]  # noqa: E731
    assert len(ids("captions_stage1")) == toy.n_train  # stage 1 (and CLIP) see the first n_train scenes
    assert [i for i in ids("mix_train") if i.startswith("train-")] == scenes(0, toy.n_train)
    share = toy.n_fresh // toy.fresh_rounds
    assert toy.fresh_rounds == 2 and share > 0
    for k in range(toy.fresh_rounds):  # each later round: its own new scenes, then the same text chats
        lo = toy.n_train + k * share
        assert [i for i in ids(f"mix_fresh{k + 1}") if i.startswith("train-")] == scenes(lo, lo + share)
        assert len(ids(f"mix_fresh{k + 1}")) == share + toy.text_in_fresh
    assert toy.natural_rounds == 2
    scene_ids = []
    for k, name in enumerate(("work-natural", "work-natural2")):  # the last rounds: scenes of their own, biased
        manifest = json.loads((data.parent / name / "manifest.json").read_text())
        assert manifest["arguments"]["cooccur"] == sw.COOCCUR_P and manifest["seed"] == 1 + k
        mix = json.loads((data.parent / name / "mix_natural.json").read_text())
        assert len(mix) == toy.n_natural + toy.text_in_natural
        scene_ids.append({json.dumps(r["scene"], sort_keys=True) for r in mix if "scene" in r})
    assert scene_ids[0] and not scene_ids[0] & scene_ids[1]
    run = json.loads((data / "tiny-llava" / "run.json").read_text())
    assert run["train_config"]["init"].endswith("stage2-round4") and run["train_config"]["lr"] == 3e-4
    assert run["train_config"]["data"].endswith("work-natural2/mix_natural.json")
    first, second, third, fourth = run["earlier_rounds"]  # the earlier rounds' runs, curves and settings, kept
    assert first["train_config"]["init"].endswith("tiny-llava-stage1") and len(first["metrics"]) == 2
    assert second["train_config"]["init"].endswith("stage2-round1") and "earlier_rounds" not in second
    assert fourth["train_config"]["data"].endswith("work-natural/mix_natural.json")
    facts = json.loads((data / "tiny-llava" / "card.json").read_text())["facts"]
    assert facts["steps"] == "2 + 2 + 2 + 2 + 2" and "records 8" in facts["round 3"]
    readme = (data / "tiny-llava" / "README.md").read_text()
    assert "in 5 rounds" in readme and "2 last rounds on natural use" in readme


@pytest.mark.slow
def test_from_round_retrains_the_last_round_alone(toy_zoo, tmp_path):
    """`--start tiny-llava --from-round 5` continues from the shipped model: rounds 1-4 are kept as the card
    describes them, round 5 trains again from a copy of the model in --out."""
    import shutil

    data, _ = toy_zoo
    out = tmp_path / "data"
    shutil.copytree(data, out)
    card = json.loads((out / "tiny-llava" / "card.json").read_text())
    card["facts"]["data of the rounds"] = "round 5 was trained later"  # a note about the kept rounds
    (out / "tiny-llava" / "card.json").write_text(json.dumps(card))
    before = card["facts"]
    build_zoo.build(out, build_zoo.TOY, data.parent / "work", progress=False, evaluate_after=False,
                    start="tiny-llava", from_round=5)
    facts = json.loads((out / "tiny-llava" / "card.json").read_text())["facts"]
    assert [facts[f"round {i}"] for i in range(1, 5)] == [before[f"round {i}"] for i in range(1, 5)]
    assert facts["data of the rounds"] == "round 5 was trained later"
    run = json.loads((out / "tiny-llava" / "run.json").read_text())
    assert run["train_config"]["init"].endswith("work-stage2-round4") and len(run["earlier_rounds"]) == 5
    with pytest.raises(ValueError, match="only with start 'tiny-llava'"):
        build_zoo.build(out, build_zoo.TOY, data.parent / "work", start="tiny-lm", from_round=4)


@pytest.mark.slow
def test_eval_only_measures_again_and_reuses_the_data(toy_zoo, tmp_path):
    data, summary = toy_zoo
    work = data.parent / "work"
    stamp = (work / "manifest.json").stat().st_mtime_ns
    again = build_zoo.main(["--scale", "toy", "--out", str(data), "--work", str(work), "--eval-only",
                            "--no-progress"])
    assert (work / "manifest.json").stat().st_mtime_ns == stamp  # same scale and seed: the data is reused
    assert again["tiny-llava"]["vqa_test"]["overall"] == summary["tiny-llava"]["vqa_test"]["overall"]
    card = json.loads((data / "tiny-llava" / "metrics.json").read_text())
    card["pope_test"] = "stale"  # --only measures what it names and keeps the rest
    (data / "tiny-llava" / "metrics.json").write_text(json.dumps(card))
    build_zoo.main(["--scale", "toy", "--out", str(data), "--work", str(work), "--eval-only", "--only", "vqa_test",
                    "--no-progress"])
    assert json.loads((data / "tiny-llava" / "metrics.json").read_text())["pope_test"] == "stale"
    build_zoo.main(["--scale", "toy", "--out", str(data), "--work", str(work), "--eval-only", "--only", "pope_test",
                    "--no-progress"])
    assert json.loads((data / "tiny-llava" / "metrics.json").read_text())["pope_test"] == card_pope(summary)
    with pytest.raises(FileNotFoundError, match="model card"):
        build_zoo.update_card(tmp_path, {"x": 1})


@pytest.mark.slow
def test_eval_data_builds_the_held_out_splits_alone_and_alike(toy_zoo, tmp_path):
    """Measuring needs no train scenes: in a fresh folder only the held-out splits are made, byte for byte those
    of the full build; the full build's folder is reused as it is."""
    data, _ = toy_zoo
    work, toy = data.parent / "work", build_zoo.TOY
    assert build_zoo.eval_data(work, toy, seed=0) == json.loads((work / "manifest.json").read_text())
    alone = build_zoo.eval_data(tmp_path / "held-out", toy, seed=0)
    assert alone["splits"]["train"] == 0 and "instruct_train.json" not in alone["files"]
    for name in ("instruct_test.json", "instruct_compositional.json", "captions_test.json", "text_val.json"):
        assert (tmp_path / "held-out" / name).read_bytes() == (work / name).read_bytes(), name
    more = build_zoo.Scale(**{**vars(toy), "n_test": toy.n_test + 1})  # other held-out splits: built again
    assert build_zoo.eval_data(tmp_path / "held-out", more, seed=0)["splits"]["test"] == toy.n_test + 1


@pytest.mark.slow
def test_zero_shot_ensembles(toy_zoo):
    """Both prompt ensembles give class probabilities; with one prompt per class they are the same thing (CLIP's
    plain zero-shot), and `clip_zero_shot` measures the shipped card's numbers again."""
    from transformers import AutoTokenizer, CLIPModel

    from minillava import pretrain
    from minillava.data import shapesworld as sw

    data = toy_zoo[0]
    clip, tok = CLIPModel.from_pretrained(str(data / "tiny-clip")).eval(), AutoTokenizer.from_pretrained(
        str(data / "tiny-clip"))
    rng = np.random.default_rng(0)
    scenes = [sw.sample_scene(rng, n_objects=1, image_size=clip.config.vision_config.image_size) for _ in range(5)]
    pixels = pretrain.render_pixels([sw.render(s) for s in scenes], clip.config.vision_config.image_size)
    many = sw.object_prompts("color", sw.COLORS)
    one = {c: ps[:1] for c, ps in many.items()}
    for prompts in (many, one):
        for ensemble in ("marginal", "mean"):
            p = pretrain.zero_shot_probs(clip, tok, pixels, prompts, ensemble)
            assert p.shape == (5, len(sw.COLORS)) and torch.allclose(p.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(pretrain.zero_shot_probs(clip, tok, pixels, one, "marginal"),
                          pretrain.zero_shot_probs(clip, tok, pixels, one, "mean"), atol=1e-5)
    assert not torch.allclose(pretrain.zero_shot_probs(clip, tok, pixels, many, "marginal"),
                              pretrain.zero_shot_probs(clip, tok, pixels, many, "mean"), atol=1e-3)
    with pytest.raises(ValueError, match="ensemble 'max'"):
        pretrain.zero_shot_probs(clip, tok, pixels, one, "max")
    metrics = json.loads((data / "tiny-clip" / "metrics.json").read_text())
    stale = {**metrics, "zero_shot_shape_acc": "stale"}
    (data / "tiny-clip" / "metrics.json").write_text(json.dumps(stale))
    again = build_zoo.main(["--scale", "toy", "--out", str(data), "--work", str(data.parent / "work"), "--eval-only",
                            "--only", "clip_zero_shot", "--no-progress"])
    assert json.loads((data / "tiny-clip" / "metrics.json").read_text()) == metrics == again["tiny-clip"]


def card_pope(summary):
    return {"pope": summary["tiny-llava"]["pope_test"]["pope"]}


def test_zero_shot_accuracy_on_known_probabilities(monkeypatch):
    """Zero-shot accuracy is the share of images whose most probable class is their label: here the classes'
    probabilities are given, and 3 of 4 images are classified right."""
    from minillava import pretrain

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    seen = {}

    def given(clip, tokenizer, pixels, prompts, ensemble):
        seen.update(prompts=prompts, ensemble=ensemble)
        return probs

    monkeypatch.setattr(pretrain, "zero_shot_probs", given)
    prompts = {"red": ["A red circle."], "blue": ["A blue circle."], "green": ["A green circle."]}
    # predicted: red, green, red, blue
    assert pretrain.zero_shot(None, None, None, ["red", "green", "blue", "blue"], prompts) == 0.75
    assert seen == {"prompts": prompts, "ensemble": "marginal"}
    assert pretrain.zero_shot(None, None, None, ["blue", "red", "green", "red"], prompts, "mean") == 0.0
    assert seen["ensemble"] == "mean"


def test_lm_corpus_has_chats_and_caption_lines():
    from minillava.data import shapesworld as sw

    data = sw.generate_records("train", 20, seed=3)
    chats = sw.text_chats(5, seed=3)
    corpus = build_zoo.lm_corpus(chats, data.captions, n_docs=2, per_doc=4)
    assert len(corpus) == 5 + 2 and corpus[0].startswith(ml.get_template("vicuna_v1").render(chats[0].messages)[:20])
    doc = corpus[-1].splitlines()
    assert doc == [r.messages[1]["content"] for r in data.captions[4:8]] and corpus[-1].endswith("\n")


@pytest.mark.slow
def test_chat_sft_learns_the_answers_and_blends_with_the_pretrained_weights(toy_zoo):
    import dataclasses

    from transformers import AutoTokenizer

    from minillava import pretrain
    from minillava.data import shapesworld as sw

    tok = AutoTokenizer.from_pretrained(str(toy_zoo[0] / "tiny-lm"))
    chats = sw.text_chats(4, seed=5)
    cfg = pretrain.LMConfig(width=32, layers=1, heads=2, kv_heads=1, ffn=64, sft_steps=40, sft_batch_size=4,
                            sft_lr=1e-2, sft_weight=1.0)
    template = ml.get_template("vicuna_v1")

    def answer_loss(lm):
        with torch.no_grad():
            enc = [template.tokenize(r.messages, tok) for r in chats]
            return sum(float(lm(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss)
                       for e in enc) / len(enc)

    before = pretrain.new_lm(cfg, tok)
    start = {k: v.clone() for k, v in before.state_dict().items()}
    loss0 = answer_loss(before)
    tuned, run = pretrain.chat_sft(before, tok, chats, cfg, progress=False)
    assert answer_loss(tuned) < 0.5 * loss0 and len(run["curve"]) == 40
    kept, _ = pretrain.chat_sft(pretrain.new_lm(cfg, tok), tok, chats, dataclasses.replace(cfg, sft_weight=0.0),
                                progress=False)
    assert all(torch.equal(v, start[k]) for k, v in kept.state_dict().items())  # weight 0: the pretrained LM


@pytest.mark.slow
def test_ablations_run_side_by_side_and_report_failures(toy_zoo, tmp_path, monkeypatch):
    from minillava.data import shapesworld as sw
    from minillava.tools import ablations

    data, _ = toy_zoo
    monkeypatch.setenv("MINILLAVA_DATA", str(data))
    out = tmp_path / "abl.json"
    summary = ablations.run(out, ["baseline", "linear_projector"], ablations.SCALES["toy"], tmp_path / "w", jobs=2)
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == {"baseline", "linear_projector"} == summary["results"].keys()
    test = load_records(tmp_path / "w" / f"data-{'-'.join(sw.KINDS)}" / "instruct_test.json")
    for name, r in saved["results"].items():  # every variant scored on the same questions: the test split's
        assert_scores_the_questions(r, test)
        assert bool(r["paper"]) == (name != "baseline")
        assert len(r["exact_by_question"]) == r["overall"]["n"] == len(r["qtypes"])
        assert r["exact_by_question"].count("1") == round(r["overall"]["exact"] * r["overall"]["n"])
    assert saved["bootstrap"]["linear_projector"]["expected"] == "lower"  # the intervals, written with the results
    assert saved["bootstrap"] == ablations.bootstrap(saved["results"])
    lm_sha = hashlib.sha256((data / "tiny-lm" / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert saved["backbones"]["tiny-lm"] == {"sha256": lm_sha, "steps x batch": "2 x 4"}  # what they started from
    monkeypatch.setenv("MINILLAVA_DATA", str(tmp_path / "empty"))  # no backbones: each variant fails, reported
    broken = ablations.run(tmp_path / "b.json", ["baseline"], ablations.SCALES["toy"], tmp_path / "w")
    assert "zoo component 'tiny-clip'" in broken["results"]["baseline"]["error"]
    assert broken["backbones"] == {"tiny-clip": None, "tiny-lm": None}
    with pytest.raises(ValueError, match="unknown ablation"):
        ablations.run(tmp_path / "c.json", ["bigger_model"])


def fake_ablation(pattern: str, qtypes: list[str]) -> dict:
    return {"exact_by_question": pattern, "qtypes": qtypes}


def test_ablation_bootstrap_judges_each_variant_where_its_finding_predicts():
    from minillava.tools import ablations

    gen = torch.Generator().manual_seed(0)
    n = 1200
    qtypes = ["multi_more" if i % 6 == 0 else "color" for i in range(n)]
    base = (torch.rand(n, generator=gen) < 0.8).tolist()
    worse = (torch.rand(n, generator=gen) < 0.1).tolist()
    bits = lambda xs: "".join("1" if x else "0" for x in xs)  # noqa: E731
    results = {
        "baseline": fake_ablation(bits(base), qtypes),
        "frozen_lm": fake_ablation(bits(b and not w for b, w in zip(base, worse)), qtypes),  # clearly lower
        "lora": fake_ablation(bits(base), qtypes),  # the same answers: similar
        "no_stage1": fake_ablation(bits(base), qtypes),  # the same answers: not lower
        "single_image_only": fake_ablation(bits(b and not q.startswith("multi_") for b, q in zip(base, qtypes)),
                                           qtypes),
        "broken": {"error": "RuntimeError: out of memory"},  # a failed variant is left out, not fatal
    }
    boot = ablations.bootstrap(results)
    assert "broken" not in boot and "verdict" not in boot["baseline"]
    assert boot["baseline"]["overall"] == ml.evaluation.paired_bootstrap(torch.tensor(base))
    assert {k: boot[k]["verdict"] for k in ("frozen_lm", "lora", "no_stage1", "single_image_only")} == {
        "frozen_lm": "agrees", "lora": "agrees", "no_stage1": "within noise", "single_image_only": "agrees"}
    single = boot["single_image_only"]
    assert single["judged_on"] == "two_image" and single["two_image"]["n"] == n // 6
    assert single["two_image"]["exact"] == 0 and single["overall"]["diff"] < 0
    with pytest.raises(ValueError, match="other questions than the baseline"):
        ablations.bootstrap({**results, "lora": fake_ablation(bits(base), qtypes[::-1])})
    with pytest.raises(ValueError, match="baseline's per-question"):
        ablations.bootstrap({"lora": results["lora"]})


def test_ablation_verdicts_read_the_interval():
    from minillava.tools.ablations import SIMILAR, verdict

    assert verdict("lower", [-0.05, -0.01]) == "agrees"
    assert verdict("lower", [-0.02, 0.01]) == "within noise"
    assert verdict("lower", [0.01, 0.03]) == "disagrees"
    assert verdict("similar", [-SIMILAR / 2, SIMILAR / 2]) == "agrees"
    assert verdict("similar", [-2 * SIMILAR, 0.0]) == "within noise"  # could be similar, could be lower
    assert verdict("similar", [-3 * SIMILAR, -1.5 * SIMILAR]) == "disagrees"


def test_shipped_ablations_started_from_the_shipped_backbones_and_carry_their_intervals():
    """Chapter 7's table: every variant measured from the zoo's tiny-clip and tiny-lm (a rebuilt zoo needs `make
    ablations` again), on the same questions, with the intervals and verdicts `bootstrap` gives for its answers."""
    from minillava.tools import ablations

    saved = json.loads((zoo.data_dir() / "results" / "ablations.json").read_text())
    assert saved["backbones"] == ablations.backbones()
    assert saved["results"].keys() == ablations.VARIANTS.keys()
    assert not [name for name, r in saved["results"].items() if "error" in r]
    assert saved["bootstrap"] == ablations.bootstrap(saved["results"])


@pytest.mark.slow
def test_ablation_backbones_name_the_weights_even_without_a_card(toy_zoo, tmp_path, monkeypatch):
    import shutil

    from minillava.tools import ablations

    data, _ = toy_zoo
    for name in ("tiny-clip", "tiny-lm"):
        (tmp_path / name).mkdir()
        shutil.copy(data / name / "model.safetensors", tmp_path / name)
    monkeypatch.setenv("MINILLAVA_DATA", str(tmp_path))
    digest = hashlib.sha256((data / "tiny-clip" / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert ablations.backbones()["tiny-clip"] == {"sha256": digest, "steps x batch": None}


@pytest.mark.slow
def test_zoo_loads_offline_from_the_build(toy_zoo, monkeypatch):
    data, _ = toy_zoo
    monkeypatch.setenv("MINILLAVA_DATA", str(data))
    clip, tok, ip = ml.load_clip("tiny-clip")
    assert type(clip).__name__ == "CLIPModel" and tok.eos_token_id != 2  # see pretrain.SPECIALS
    lm, tok = ml.load_lm("tiny-lm")
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    for name in ("tiny-llava-stage1", "tiny-llava"):
        model, processor = ml.load(name)
        b = processor([{"role": "user", "content": "<image>\nWhat color is the circle?"}],
                      [ml.load_image(next((data.parent / "work" / "images").iterdir()))], add_generation_prompt=True)
        assert model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=2).shape[0] == 1
    assert processor.template.name == "vicuna_v1"


def test_the_shipped_zoo_is_what_full_describes():
    """`make zoo` rebuilds what ships: data/zoo_build.json records FULL's scale, and tiny-llava's run.json holds
    one run per round of stage 2, each with FULL's settings for that round and as many steps as its data gives."""
    from dataclasses import asdict

    full = build_zoo.FULL
    summary = json.loads((zoo.data_dir() / "zoo_build.json").read_text())
    assert summary["scale"] == json.loads(json.dumps(asdict(full)))
    assert summary["data"]["train"] == full.n_train + full.n_fresh
    last = json.loads((zoo.path("tiny-llava") / "run.json").read_text())
    rounds = [*last.pop("earlier_rounds"), last]
    assert len(rounds) == 1 + full.fresh_rounds + full.natural_rounds  # and the natural-use rounds
    records = [full.n_train + full.text_in_stage2] + [full.n_fresh // full.fresh_rounds + full.text_in_fresh] * (
        full.fresh_rounds) + [full.n_natural + full.text_in_natural] * full.natural_rounds
    settings_each = [full.stage2] + [full.stage2_fresh] * full.fresh_rounds + [full.stage2_natural] * (
        full.natural_rounds)
    for k, (run, settings, n) in enumerate(zip(rounds, settings_each, records, strict=True)):
        cfg = run["train_config"]
        assert {key: cfg[key] for key in settings} == settings, k
        assert len(run["metrics"]) == np.ceil(cfg["epochs"] * (n // cfg["batch_size"])), k  # full batches
    facts = json.loads((zoo.path("tiny-llava") / "card.json").read_text())["facts"]
    assert facts["steps"] == " + ".join(str(len(r["metrics"])) for r in rounds)


@pytest.mark.slow
def test_stage1_records_zoo_names_not_paths(toy_zoo):
    data, _ = toy_zoo
    cfg = json.loads((data / "tiny-llava-stage1" / "config.json").read_text())
    assert cfg["vision"] == "tiny-clip" and cfg["lm"] == "tiny-lm"  # so the folder works from any clone


@pytest.mark.slow
def test_tokenizer_speaks_the_template(toy_zoo, monkeypatch):
    data, _ = toy_zoo
    monkeypatch.setenv("MINILLAVA_DATA", str(data))
    _, tok = ml.load_lm("tiny-lm")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ml.get_template("vicuna_v1").render(msgs)
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # adds BOS, as Llama's tokenizer does


def test_missing_zoo_files_get_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAVA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="zoo component 'tiny-llava': no weights at"):
        ml.load("tiny-llava")
    with pytest.raises(ValueError, match="unknown zoo component 'huge-llava'"):
        zoo.path("huge-llava")
    with pytest.raises(ValueError, match="'tiny-lm' is a backbone"):
        ml.load("tiny-lm")
    with pytest.raises(FileNotFoundError, match="no such zoo component or folder"):
        zoo.resolve("./nowhere")


@pytest.mark.slow
def test_rebuild_is_deterministic(tmp_path):
    a = build_zoo.build(tmp_path / "a", build_zoo.TOY, tmp_path / "wa", progress=False)
    b = build_zoo.build(tmp_path / "b", build_zoo.TOY, tmp_path / "wb", progress=False)
    for name in ("tiny-clip", "tiny-lm"):
        wa = ml.utils.load_tensors(tmp_path / "a" / name / "model.safetensors")
        wb = ml.utils.load_tensors(tmp_path / "b" / name / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["tiny-llava"] == b["tiny-llava"]  # the same measurements
    runs = [json.loads((tmp_path / x / "tiny-llava" / "run.json").read_text()) for x in "ab"]
    losses = [[m["loss"] for m in r["metrics"]] for r in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.slow
def test_rebuild_from_a_later_step_keeps_the_earlier_components(tmp_path):
    import dataclasses

    data, work = tmp_path / "data", tmp_path / "work"
    first = build_zoo.build(data, build_zoo.TOY, work, progress=False, evaluate_after=False)
    kept = {n: (data / n / "model.safetensors").read_bytes() for n in ("tiny-clip", "tiny-lm")}
    stage1 = (data / "tiny-llava-stage1" / "projector.safetensors").read_bytes()
    import shutil

    shutil.rmtree(data / "tiny-llava")
    summary = json.loads((data / "zoo_build.json").read_text())
    summary["hardware"] = "another machine"  # as an older summary had it: one machine for all
    (data / "zoo_build.json").write_text(json.dumps(summary))
    again = build_zoo.build(data, build_zoo.TOY, work, progress=False, evaluate_after=False, start="tiny-llava")
    here = build_zoo.hardware(pick_device())
    assert again["hardware"] == {**dict.fromkeys(build_zoo.STEPS[:3], "another machine"), "tiny-llava": here}
    assert {n: (data / n / "model.safetensors").read_bytes() for n in kept} == kept
    assert (data / "tiny-llava-stage1" / "projector.safetensors").read_bytes() == stage1
    assert (data / "tiny-llava" / "model.safetensors").is_file()  # rebuilt
    assert again["rebuilt"] == ["tiny-llava"] and again["tiny-llava"] == first["tiny-llava"]  # same seed
    other = dataclasses.replace(build_zoo.TOY, stage1={**build_zoo.TOY.stage1, "lr": 5e-4})
    with pytest.raises(ValueError, match=r"kept tiny-clip, tiny-lm, tiny-llava-stage1: .*stage1"):
        build_zoo.build(data, other, work, progress=False, evaluate_after=False, start="tiny-llava")
    later = build_zoo.build(data, other, work, progress=False, evaluate_after=False, start="tiny-llava-stage1")
    assert later["hardware"] == {"tiny-clip": "another machine", "tiny-lm": "another machine",
                                 "tiny-llava-stage1": here, "tiny-llava": here}  # the kept ones keep theirs
    with pytest.raises(ValueError, match="start 'tiny-bert'"):
        build_zoo.build(data, build_zoo.TOY, work, start="tiny-bert")
    for argv in (["--only", "vqa_test"], ["--eval-only", "--start", "tiny-lm"]):
        with pytest.raises(SystemExit):
            build_zoo.main(["--scale", "toy", "--out", str(data), *argv])


def test_shipped_tokenizers_carry_the_template_they_were_trained_with():
    """Each shipped tokenizer's chat template is `vicuna_v1`'s as `to_jinja` writes it today (content parts
    included), so `apply_chat_template` on a shipped folder renders the prompt the model was trained on."""
    jinja = ml.get_template("vicuna_v1").to_jinja()
    for name in ("tiny-clip", "tiny-lm", "tiny-llava"):
        assert (zoo.path(name) / "chat_template.jinja").read_text() == jinja, name


def test_a_saved_processor_writes_its_own_template_into_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    _, processor = ml.load("tiny-llava")
    before = processor.tokenizer.chat_template
    other = processor.with_template("llava_hf")
    other.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == ml.get_template("llava_hf").to_jinja()
    assert processor.tokenizer.chat_template == before  # the processor in memory is unchanged
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]}]
    rendered = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(parts, tokenize=False,
                                                                               add_generation_prompt=True)
    assert rendered == ml.get_template("llava_hf").render(
        [{"role": "user", "content": "<image>\nWhat is it?"}], add_generation_prompt=True)


def test_natural_data_builds_one_rounds_records_and_trains_nothing(tmp_path, capsys):
    """`--natural-data K`: natural-use round K's training file, as that round of `make zoo` writes it (the tower
    ablation retrains on round 9's), and nothing else."""
    work, toy = tmp_path / "sw", build_zoo.TOY
    out = build_zoo.main(["--scale", "toy", "--work", str(work), "--out", str(tmp_path / "zoo"), "--natural-data", "2"])
    path = tmp_path / "sw-natural2" / "mix_natural.json"
    assert out == {"natural_data": str(path)} and path.is_file()
    records = load_records(path)
    assert len(records) == toy.n_natural + toy.text_in_natural
    assert [(r.id, r.messages) for r in records] == [(r.id, r.messages) for r in
                                                     build_zoo.natural_round(work, toy, 0, k=1)]
    assert not (tmp_path / "zoo").exists() and not work.exists()  # nothing trained, no other data built
    with pytest.raises(SystemExit):
        build_zoo.main(["--scale", "toy", "--work", str(work), "--natural-data", "3"])
    assert "--natural-data: scale toy has natural-use rounds 1 to 2, got 3" in capsys.readouterr().err
