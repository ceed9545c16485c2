"""Bad input at the edges: half-broken transformers folders, transformers' typed chat messages, the chat command
line fed bad images and bad bytes, and small traps in data and images. Each is refused with the input named, or
handled the way the docstrings say."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_processor, random_image
from PIL import Image
from safetensors.torch import load_file, save_file

import minillava as ml
from minillava.data.records import DataError, parse_record

REPO = Path(__file__).resolve().parent.parent


# ---- 5. transformers folders load strictly ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, model, processor):
    return ml.export_hf(model, processor, tmp_path_factory.mktemp("hf") / "llava")


def edit_weights(folder: Path, change) -> None:
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, **text_config) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(text_config)
    (folder / "config.json").write_text(json.dumps(config))


def drop_projector(folder):
    edit_weights(folder, lambda s: [s.pop(k) for k in list(s) if k.startswith("multi_modal_projector.")])


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def misshape(folder):
    edit_weights(folder, lambda s: s.update({"multi_modal_projector.linear_2.weight": torch.zeros(10, 48)}))


BREAKAGES = {  # what is done to a good folder -> what the error must say
    "projector weights deleted": (drop_projector, r"model folder '\S*llava': weights do not match the model "
                                                  r"\(missing: model\.multi_modal_projector\.linear_1\.bias"),
    "config with fewer layers": (lambda f: edit_config(f, num_hidden_layers=1),
                                 r"unexpected: model\.language_model\.layers\.1\."),
    "config with more layers": (lambda f: edit_config(f, num_hidden_layers=3),
                                r"missing: model\.language_model\.layers\.2\."),
    "config with narrower layers": (lambda f: edit_config(f, intermediate_size=64),
                                    r"wrong shape: model\.language_model\.layers\.0\.mlp\.\w+\.weight"),
    "a weight of the wrong shape": (misshape, r"wrong shape: model\.multi_modal_projector\.linear_2\.weight "
                                              r"\(10, 48\) != \(48, 48\)"),
    "weights file truncated": (truncate, r"weights '\S*model\.safetensors': cannot be read as safetensors"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_half_broken_transformers_folders_are_refused(case, hf_folder, tmp_path):
    breaker, message = BREAKAGES[case]
    folder = tmp_path / "llava"
    shutil.copytree(hf_folder, folder)
    breaker(folder)
    with pytest.raises(ValueError, match=message):
        ml.load(folder, device="cpu")


def _without(key):
    return lambda folder: (folder / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != key}))


def _processor_edit(**changes):
    def edit(folder):
        path = folder / "minillava_processor.json"
        cfg = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return edit


@pytest.mark.parametrize("breakage, error, match", [
    (lambda f: (f / "config.json").write_text("[1, 2]"), ValueError, "config.json': expected a JSON object, got list"),
    (_without("text_config"), ValueError, "config.json': missing 'text_config'"),
    (_processor_edit(num_image_tokens=None), ValueError, "minillava_processor.json': missing 'num_image_tokens'"),
    (_processor_edit(num_image_tokens=5), ValueError, "its processor puts 5 tokens per image in the prompt, its "
                                                      "vision tower gives"),
    (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], FileNotFoundError,
     "no tokenizer files"),
], ids=["list", "no-text-config", "no-image-tokens", "image-tokens-disagree", "no-tokenizer"])
def test_half_broken_minillava_folders_are_refused(model, processor, tmp_path, breakage, error, match):
    folder = ml.save(model, processor, tmp_path / "model")
    breakage(folder)
    with pytest.raises(error, match=match):
        ml.load(folder, device="cpu")


def test_chat_refuses_a_folder_without_projector_weights(hf_folder, tmp_path, monkeypatch, capsys):
    from minillava.cli import main

    folder = tmp_path / "llava"
    shutil.copytree(hf_folder, folder)
    drop_projector(folder)
    monkeypatch.setattr("sys.stdin", io.StringIO("What color is the circle?\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert "assistant> " not in captured.out
    assert "missing: model.multi_modal_projector.linear_1.bias" in captured.err


# ---- 6. transformers' typed chat messages -----------------------------------------------------------------------
def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}
CONVERSATIONS = {  # name: (content as a string with "<image>", the same as transformers' typed parts, prompt?)
    "image first": ([{"role": "user", "content": "<image>\nWhat color is the circle?"}],
                    [{"role": "user", "content": [IMAGE, text("What color is the circle?")]}], True),
    "image last": ([{"role": "user", "content": "What is this? <image>"}],
                   [{"role": "user", "content": [text("What is this? "), IMAGE]}], True),
    "a training pair": ([{"role": "user", "content": "<image>\nDescribe it."},
                         {"role": "assistant", "content": "A red circle."}],
                        [{"role": "user", "content": [IMAGE, text("Describe it.")]},
                         {"role": "assistant", "content": [text("A red circle.")]}], False),
    "system, two images, two turns": (
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "<image> and <image>: which has more shapes?"},
         {"role": "assistant", "content": "The first."}, {"role": "user", "content": "Why?"}],
        [{"role": "system", "content": [text("Be brief.")]},
         {"role": "user", "content": [IMAGE, text(" and "), IMAGE, text(": which has more shapes?")]},
         {"role": "assistant", "content": [text("The first.")]}, {"role": "user", "content": [text("Why?")]}],
        True),
}
SINGLE_TURN = ("image first", "image last", "a training pair")


@pytest.mark.parametrize("name", ml.TEMPLATES)
def test_exported_template_renders_both_content_forms_as_minillava(name, tokenizer, model, tmp_path):
    from transformers import AutoProcessor

    template = ml.TEMPLATES[name]
    ml.export_hf(model, make_processor(tokenizer, model, template=name), tmp_path / "hf")
    theirs = AutoProcessor.from_pretrained(tmp_path / "hf")
    for case, (as_string, typed, prompt) in CONVERSATIONS.items():
        if template.caption_only and case not in SINGLE_TURN:
            continue
        ours = template.render(as_string, add_generation_prompt=prompt)
        assert template.render(typed, add_generation_prompt=prompt) == ours, case
        for messages in (as_string, typed):
            assert theirs.apply_chat_template(messages, add_generation_prompt=prompt) == ours, case


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml_direct"])
def test_transformers_pipeline_answers_as_the_chat_session(name, tokenizer, model, tmp_path):
    from transformers import pipeline

    processor = make_processor(tokenizer, model, template=name)
    ml.export_hf(model, processor, tmp_path / "hf")
    image, question = random_image(seed=7), "What color is the circle?"
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "hf"), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, text(question)]}]
    greedy = {"max_new_tokens": 6, "generate_kwargs": {"do_sample": False}}
    answer = pipe(text=messages, return_full_text=False, **greedy)[0]["generated_text"]
    ids = pipe(text=messages, return_tensors=True, **greedy)[0]["generated_token_ids"]
    chat = ml.ChatSession(model, processor, template=None, max_new_tokens=6)
    assert answer.strip() == chat.ask(question, [image])
    assert ids[-6:].tolist() == chat.stats["new_token_ids"]  # (a random model's text is mostly U+FFFD)


# ---- 7. the chat command line ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory, model, processor):
    folder = tmp_path_factory.mktemp("cli")
    ml.save(model, processor, folder / "tiny")
    random_image(seed=1).save(folder / "a.png")
    random_image(seed=2).save(folder / "b.png")
    (folder / "bad.png").write_bytes(b"garbage")
    Image.new("RGB", (60000, 2)).save(folder / "strip.png")
    return folder


def run_chat(folder: Path, stdin: bytes, *options: str, errors: str = "strict") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": f"utf-8:{errors}"}
    return subprocess.run([sys.executable, "-m", "minillava", "chat", "--model", str(folder / "tiny"),
                           "--max-new-tokens", "3", *options], input=stdin, capture_output=True, timeout=180,
                          env=env, cwd=folder)


def test_chat_exits_on_a_bad_image_given_at_start(cli_folder):
    done = run_chat(cli_folder, b"What color is the circle?\n", "--image", "a.png", "bad.png")
    assert done.returncode == 2
    assert "assistant> " not in done.stdout.decode()
    assert "image 'bad.png': not an image file" in done.stderr.decode()


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_refuses_bad_turns_and_goes_on(cli_folder, errors):
    lines = [b"/image a.png", b"Compare <image> and <image>.",  # refused: its image is not kept for later
             b"/image b.png", b"Compare <image> and <image>.",  # so this one has 1 image for 2 placeholders
             b"/image strip.png",  # refused when attached, naming the file
             b"Is it \xff red?",  # not UTF-8: said, and the chat goes on
             b"What color is the circle?", b""]
    done = run_chat(cli_folder, b"\n".join(lines), errors=errors)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "Traceback" not in err
    assert out.count("assistant> ") == 1
    assert err.count("2 '<image>' placeholders but 1 images") == 2
    assert "image 'strip.png': 60000x2 pads to a 60000x60000 square" in err
    assert "not valid UTF-8" in err
    assert "(image 'strip.png' attached" not in out


def test_chat_offers_the_context_policy(cli_folder, monkeypatch, capsys):
    from minillava.cli import main

    long_question = "Where is the blue star and the green square? " * 2  # with the system prompt: 172 tokens
    args = ["chat", "--model", str(cli_folder / "tiny"), "--max-new-tokens", "60"]  # of 256: one turn fits
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_question}\n{long_question}\n"))
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 1
    assert "--context-policy drop_oldest" in captured.err and "context_policy=" not in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_question}\n{long_question}\n"))
    assert main([*args, "--context-policy", "drop_oldest"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_a_refused_turn_leaves_the_chat_session_as_it_was(model, processor, cli_folder):
    def session():
        return ml.ChatSession(model, processor, system="", max_new_tokens=4)

    chat, fresh = session(), session()
    for c in (chat, fresh):
        c.ask("What color is the circle?", [cli_folder / "a.png"])
    refused = [("Compare <image> and <image>.", [cli_folder / "b.png"], "2 '<image>' placeholders but 1 images"),
               ("What is this?", [cli_folder / "strip.png"], r"strip.png': 60000x2 pads to a 60000x60000 square"),
               ("Is it \udcff red?", [], r"question: not valid Unicode text"),
               ("Is it red</s>?", [], r"'</s>'")]
    before = (chat.messages, chat.stats)
    for question, images, message in refused:
        with pytest.raises(ValueError, match=message):
            chat.stream(question, images)  # refused when asked, before any answer is generated
        assert (chat.messages, chat.stats) == before
    assert chat.ask("Where is it?") == fresh.ask("Where is it?")
    assert chat.stats["reused_tokens"] == fresh.stats["reused_tokens"] > 0


# ---- 8. smaller traps ------------------------------------------------------------------------------------------
def test_a_long_strip_is_refused_when_loaded(tmp_path, processor):
    Image.new("RGB", (60000, 2)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"image '\S*strip.png': 60000x2 pads to a 60000x60000 square"):
        processor.image_processor.load(tmp_path / "strip.png")
    square = ml.ImageProcessor(image_size=336, aspect="square")  # its shortest edge to 336: 3.4 billion pixels
    with pytest.raises(ValueError, match=r"image '\S*strip.png': 60000x2 resizes to 10080000x336"):
        square.load(tmp_path / "strip.png")


def record(*turns, image=None, id="r1"):
    raw = {"id": id, "conversations": [{"from": f, "value": v} for f, v in turns]}
    return raw if image is None else {**raw, "image": image}


def test_a_lone_surrogate_in_a_record_is_named():
    raw = json.loads(json.dumps(record(("human", "Is it red?"), ("gpt", "Yes \udcff."))))
    with pytest.raises(DataError, match=r"record 3 \(id 'r1'\): turn 1: 'value': not valid Unicode text "
                                        r"\(lone surrogate '\\udcff' at character 4"):
        parse_record(raw, None, "data file 'x.json', record 3", check_files=False)


def test_an_image_placeholder_in_an_answer_is_named(processor):
    raw = record(("human", "<image>\nWhat is it?"), ("gpt", "It is <image>."), image="a.png")
    with pytest.raises(DataError, match=r"\(id 'r1'\): turn 1 is an answer holding '<image>'"):
        parse_record(raw, None, "data file 'x.json', record 0", check_files=False)
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "<image>"}]
    with pytest.raises(ValueError, match="message 1: an assistant message cannot hold '<image>'"):
        processor.encode(messages, [random_image()])


@pytest.mark.parametrize("answer, token", [("Red</s> and blue.", "</s>"), ("A <pad> shape.", "<pad>")])
def test_special_token_text_in_an_answer_is_refused(processor, answer, token):
    messages = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": answer}]
    with pytest.raises(ValueError, match=rf"sample 'r7': message 1 holds {token!r}, the text of a special "
                                         "token of the tokenizer"):
        processor.template.tokenize(messages, processor.tokenizer, sample_id="r7")


def test_16_bit_greyscale_keeps_its_top_8_bits(tmp_path, tokenizer, model):
    from transformers import AutoProcessor

    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472: a dark-to-light ramp
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(ml.load_image(tmp_path / "deep.png"))
    assert np.array_equal(rgb, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2))
    # transformers converts with PIL's convert("RGB"), which saturates: every value above 255 becomes white
    processor = make_processor(tokenizer, model)
    ml.export_hf(model, processor, tmp_path / "hf")
    theirs = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor
    white = (1 - np.array(ml.vision.CLIP_MEAN)) / np.array(ml.vision.CLIP_STD)
    pixels = theirs(Image.open(tmp_path / "deep.png"), return_tensors="pt")["pixel_values"][0]
    assert np.isclose(pixels.numpy(), white[:, None, None], atol=1e-5).mean() > 0.99
    ours = processor.image_processor([tmp_path / "deep.png"])[0]
    assert ours.std() > 0.5  # the ramp is still there
