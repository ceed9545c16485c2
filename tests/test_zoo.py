"""The zoo: the whole rebuild pipeline at toy size, loading what it wrote, and clear errors when files are missing."""

import json

import pytest
import torch

import minillava as ml
from minillava import build_zoo, zoo


@pytest.fixture(scope="module")
def toy_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    summary = build_zoo.build(root / "data", build_zoo.TOY, root / "work", progress=False)
    return root / "data", summary


def test_toy_build_writes_every_component_with_a_card(toy_zoo):
    data, summary = toy_zoo
    for name in zoo.COMPONENTS:
        card = (data / name / "README.md").read_text()
        assert card.startswith(f"# {name}") and "## Metrics" in card
        assert json.loads((data / name / "metrics.json").read_text())
        assert not list((data / name).glob("*.bin")) and not list((data / name).glob("*.pt"))
    assert set(summary["seconds"]) >= {"data", "tiny-clip", "tiny-lm", "stage1", "stage2", "eval", "total"}
    assert 0 <= summary["tiny-clip"]["zero_shot_color_acc"] <= 1
    assert summary["tiny-lm"]["perplexity_text_val"] > 1
    assert set(summary["tiny-llava"]["vqa"]) == {"test", "compositional"}


def test_zoo_loads_offline_from_the_build(toy_zoo, monkeypatch):
    data, _ = toy_zoo
    monkeypatch.setenv("MINILLAVA_DATA", str(data))
    clip, tok, ip = zoo.load("tiny-clip")
    assert type(clip).__name__ == "CLIPModel" and tok.eos_token_id != 2  # see pretrain.SPECIALS
    lm, tok = zoo.load("tiny-lm")
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    for name in ("tiny-llava-stage1", "tiny-llava"):
        model, processor = zoo.load(name)
        b = processor([{"role": "user", "content": "<image>\nWhat color is the circle?"}],
                      [ml.load_image(next((data.parent / "work" / "images").iterdir()))], add_generation_prompt=True)
        assert model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=2).shape[0] == 1
    assert processor.template.name == "vicuna_v1"


def test_stage1_records_zoo_names_not_paths(toy_zoo):
    data, _ = toy_zoo
    cfg = json.loads((data / "tiny-llava-stage1" / "config.json").read_text())
    assert cfg["vision"] == "tiny-clip" and cfg["lm"] == "tiny-lm"  # so the folder works from any clone


def test_tokenizer_speaks_the_template(toy_zoo, monkeypatch):
    data, _ = toy_zoo
    monkeypatch.setenv("MINILLAVA_DATA", str(data))
    _, tok = zoo.load("tiny-lm")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ml.get_template("vicuna_v1").render(msgs)
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # adds BOS, as Llama's tokenizer does


def test_missing_zoo_files_get_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAVA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="zoo component 'tiny-llava': no weights at"):
        zoo.load("tiny-llava")
    with pytest.raises(ValueError, match="unknown zoo component 'huge-llava'"):
        zoo.load("huge-llava")
    with pytest.raises(FileNotFoundError, match="no such zoo component or folder"):
        zoo.resolve("./nowhere")


def test_rebuild_is_deterministic(tmp_path):
    a = build_zoo.build(tmp_path / "a", build_zoo.TOY, tmp_path / "wa", progress=False)
    b = build_zoo.build(tmp_path / "b", build_zoo.TOY, tmp_path / "wb", progress=False)
    for name in ("tiny-clip", "tiny-lm"):
        wa = ml.utils.load_tensors(tmp_path / "a" / name / "model.safetensors")
        wb = ml.utils.load_tensors(tmp_path / "b" / name / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["tiny-llava"]["final_train_loss"] == b["tiny-llava"]["final_train_loss"]
