"""Parity with transformers' LlavaForConditionalGeneration, both ways, for CLIP (with CLS) and SigLIP towers."""

import copy
import json

import pytest
import torch
from conftest import make_model, make_processor, random_image, text_config, vision_config
from safetensors import safe_open

import minillava as ml
from minillava.hf import load_hf

TWO_IMAGES = [{"role": "user", "content": "<image> and <image>: which has more shapes?"},
              {"role": "assistant", "content": "The first."}]


def hf_llava(tokenizer, kind):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(1)
    cfg = LlavaConfig(vision_config=vision_config(kind).to_dict(), text_config=text_config(len(tokenizer)).to_dict(),
                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default" if kind == "clip" else "full")
    return LlavaForConditionalGeneration(cfg).eval()


def hf_logits(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["images"]).logits


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_hf_gives_transformers_logits(tmp_path, tokenizer, kind):
    hf = hf_llava(tokenizer, kind)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, processor = ml.load(tmp_path, device="cpu")
    b = processor(TWO_IMAGES, [random_image(seed=1), random_image(24, 50, seed=2)])
    with torch.no_grad():
        ours = model(**b).logits
    assert (ours - hf_logits(hf, b)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_hf_loads_in_transformers(tmp_path, tokenizer, kind):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = make_model(tokenizer, kind=kind)
    processor = make_processor(tokenizer, model)
    ml.export_hf(model, processor, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ims = [random_image(seed=1), random_image(24, 50, seed=2)]
    b = processor(TWO_IMAGES, ims)
    with torch.no_grad():
        ours = model(**b).logits
    assert (ours - hf_logits(hf, b)).abs().max() <= 1e-5
    # transformers' own processor expands <image> to the same count and preprocesses identically
    hp = AutoProcessor.from_pretrained(tmp_path / "hf")
    enc = hp(text=["<image> and <image>: which?"], images=ims, return_tensors="pt")
    assert int((enc["input_ids"] == model.image_token_id).sum()) == 2 * model.num_image_tokens
    assert torch.allclose(enc["pixel_values"], b["images"], atol=1e-5)


def test_export_writes_the_legacy_layout(tmp_path, tokenizer, model, processor):
    ml.export_hf(model, processor, tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"vision_tower.vision_model", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2", "language_model.model", "language_model.lm_head"}
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["image_token_index"] == model.image_token_id
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["text_config"]["dtype"] == "float32"
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())  # transformers stops where we do
    assert gen["eos_token_id"] in (processor.stop_token_ids(), *processor.stop_token_ids())
    ml.export_hf(copy.deepcopy(model).to(torch.bfloat16), processor, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["text_config"]["dtype"] == cfg["vision_config"]["dtype"] == "bfloat16"


def test_roundtrip_through_transformers(tmp_path, model, processor):
    ml.export_hf(model, processor, tmp_path / "hf")
    back, proc = ml.load(tmp_path / "hf", device="cpu")
    b = proc(TWO_IMAGES, [random_image(seed=3), random_image(seed=4)])
    assert torch.equal(back(**b).logits, model(**b).logits)
    assert proc.image_processor == processor.image_processor
    assert proc.template.name == processor.template.name


@pytest.mark.parametrize("name", ["chatml_direct", "plain"])
def test_the_exported_template_comes_back(tmp_path, model, processor, name):
    """`load` reads the template back from the exported chat template, not a fixed default."""
    ml.export_hf(model, processor.with_template(name), tmp_path / "hf")
    assert ml.load(tmp_path / "hf", device="cpu")[1].template.name == name
    assert ml.load(tmp_path / "hf", device="cpu", template="vicuna_v1")[1].template.name == "vicuna_v1"


def test_greedy_generation_matches_transformers(tmp_path, model, processor):
    from transformers import LlavaForConditionalGeneration

    ml.export_hf(model, processor, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    convs = [[TWO_IMAGES[0]], [{"role": "user", "content": "<image>\nWhat color is the circle?"}]]
    ims = [[random_image(seed=1), random_image(seed=2)], [random_image(seed=3)]]
    b = processor(convs, ims, add_generation_prompt=True)
    ours = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=10)
    theirs = hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["images"],
                         max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs[:, b["input_ids"].shape[1]:])


def test_interop_errors(tmp_path, tokenizer, model, processor):
    linear = make_model(tokenizer)
    linear.projector = ml.build_projector("linear", 32, 48)
    with pytest.raises(ValueError, match="projector 'linear' has no equivalent"):
        ml.export_hf(linear, processor, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    from peft import LoraConfig, get_peft_model

    wrapped = make_model(tokenizer)
    wrapped.language_model = get_peft_model(wrapped.language_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="still holds LoRA adapters"):
        ml.export_hf(wrapped, processor, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="no such zoo component or folder"):
        ml.load(tmp_path / "missing")
    ml.save(model, processor, tmp_path / "native")
    with pytest.raises(ValueError, match="not a transformers Llava folder"):
        load_hf(tmp_path / "native")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type 'clip'"):
        ml.load(tmp_path / "clip")
    ml.export_hf(model, processor, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, match in (({"image_token_index": model.image_token_id + 1}, "the tokenizer's '<image>' is"),
                          ({"vision_feature_layer": [-2, -1]}, "several layers are not supported")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_hf(tmp_path / "hf")
