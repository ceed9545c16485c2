"""Image loading, LLaVA's preprocessing (checked against transformers' processors) and the vision tower."""

import io

import numpy as np
import pytest
import torch
from conftest import random_image, vision_config
from PIL import Image

import minillava as ml
from minillava.vision import CLIP_MEAN, CLIP_STD, check_image_file, expand2square, mean_color


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_pad_colour_is_llavas():
    assert mean_color(CLIP_MEAN) == (122, 116, 104)


def test_expand2square_centres_on_mean_colour():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = np.asarray(expand2square(img, mean_color()))
    assert sq.shape == (40, 40, 3)
    assert (sq[:10] == (122, 116, 104)).all() and (sq[30:] == (122, 116, 104)).all()
    assert (sq[10:30] == (255, 0, 0)).all()
    tall = np.asarray(expand2square(Image.new("RGB", (10, 30), (0, 0, 255)), (1, 2, 3)))
    assert tall.shape == (30, 30, 3) and (tall[:, :10] == (1, 2, 3)).all() and (tall[:, 10:20] == (0, 0, 255)).all()


@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("size", [(40, 30), (24, 50), (32, 32), (300, 7)])
def test_preprocessing_matches_transformers(aspect, size):
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    image = random_image(*size, seed=size[0])
    ours = ml.ImageProcessor(image_size=32, aspect=aspect)([image])
    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ref = (LlavaImageProcessorPil(do_pad=True, **kw) if aspect == "pad" else CLIPImageProcessorPil(**kw))(
        [image], return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode):
    base = random_image(16, 12)
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    else:
        img = base.convert(mode)
    out = ml.load_image(img)
    assert out.mode == "RGB" and out.size == (16, 12)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(ml.load_image(img)).min() == 255


def test_premultiplied_alpha_is_composited_as_straight_alpha():
    """"La" and "RGBa" hold colour times alpha; composited on white they give what "LA" and "RGBA" give."""
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, 128  # grey 199 (100 * 255 / 128) at half opacity
    straight = ml.load_image(Image.fromarray(np.stack([np.full((2, 2), 199), la[..., 1]], -1).astype(np.uint8), "LA"))
    assert np.array_equal(np.asarray(ml.load_image(Image.frombytes("La", (2, 2), la.tobytes()))), np.asarray(straight))
    rgba = Image.new("RGBA", (2, 2), (199, 0, 0, 128))
    assert np.abs(np.asarray(ml.load_image(rgba.convert("RGBa")), dtype=int)
                  - np.asarray(ml.load_image(rgba), dtype=int)).max() <= 1


def test_load_from_path_and_bytes(tmp_path):
    img = random_image(20, 10)
    (tmp_path / "a.png").write_bytes(png_bytes(img))
    assert np.array_equal(np.asarray(ml.load_image(tmp_path / "a.png")), np.asarray(img))
    assert np.array_equal(np.asarray(ml.load_image(png_bytes(img))), np.asarray(img))


def test_bad_images_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope.png': not found"):
        ml.load_image("nope.png")
    (tmp_path / "broken.png").write_bytes(png_bytes(random_image(20, 20))[:60])
    with pytest.raises(ValueError, match="broken.png'.*cannot be decoded"):
        ml.load_image(tmp_path / "broken.png")
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(ValueError, match="text.jpg': not an image file"):
        ml.load_image(tmp_path / "text.jpg")
    with pytest.raises(ValueError, match="zero size"):
        ml.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="expected a path"):
        ml.load_image(123)


def test_decompression_bomb_is_refused(tmp_path):
    # 9000 x 9000 one-bit pixels compress to a few kB but would decode to 243 MB of RGB
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match="bomb.png'.*larger than"):
        ml.load_image(path)
    with pytest.raises(ValueError, match="larger than the 100 pixels"):
        ml.load_image(random_image(20, 20), max_pixels=100)


def test_unknown_aspect():
    with pytest.raises(ValueError, match="aspect 'stretch'"):
        ml.ImageProcessor(aspect="stretch")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_selects_layer_and_drops_cls(kind):
    from transformers import AutoModel

    torch.manual_seed(0)
    vision = AutoModel.from_config(vision_config(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    hidden = vision(pixel_values=x, output_hidden_states=True).hidden_states
    tower = ml.VisionTower(vision)
    feats = tower(x)
    expected = hidden[-2][:, 1:] if kind == "clip" else hidden[-2]  # SigLIP has no CLS: drop nothing
    assert tower.has_cls == (kind == "clip")
    assert feats.shape == (2, 16, 32) and tower.num_tokens == 16
    assert torch.equal(feats, expected)
    full = ml.VisionTower(vision, feature_layer=-1, select="cls_patch")
    assert torch.equal(full(x), hidden[-1])
    assert full.num_tokens == (17 if kind == "clip" else 16)


def test_tower_is_frozen_and_stays_in_eval():
    from transformers import AutoModel

    tower = ml.VisionTower(AutoModel.from_config(vision_config()))
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.model.training
    assert not tower(torch.randn(1, 3, 32, 32)).requires_grad


def test_tower_from_dual_encoder():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(vision_config=vision_config().to_dict(),
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    clip = CLIPModel(cfg).eval()
    tower = ml.VisionTower(clip)
    x = torch.randn(1, 3, 32, 32)
    ref = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(tower(x), ref)


def test_tower_rejects_bad_settings():
    from transformers import AutoModel

    vision = AutoModel.from_config(vision_config())
    with pytest.raises(ValueError, match="feature select 'cls'"):
        ml.VisionTower(vision, select="cls")
    with pytest.raises(ValueError, match="feature layer 7"):
        ml.VisionTower(vision, feature_layer=7)


def test_check_image_file_finds_what_only_decoding_would(tmp_path):
    data = png_bytes(random_image(20, 20))
    (tmp_path / "ok.png").write_bytes(data)
    check_image_file(tmp_path / "ok.png")
    (tmp_path / "torn.png").write_bytes(data[:-30])  # the header and size still read
    assert Image.open(tmp_path / "torn.png").size == (20, 20)
    with pytest.raises(ValueError, match="torn.png'.*cannot be decoded"):
        check_image_file(tmp_path / "torn.png")
    with pytest.raises(FileNotFoundError, match="'nope.png': not found"):
        check_image_file("nope.png")
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        check_image_file(tmp_path)


def test_check_image_file_finds_a_cut_off_jpeg(tmp_path):
    """A JPEG's header reads and PIL's verify() passes when its end is missing (a cut-off download): the
    missing end-of-image marker makes the check decode it. Data after the marker (phones' motion photos) is
    allowed."""
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="JPEG")
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as image:
        image.verify()  # what the header check alone would accept
    with pytest.raises(ValueError, match="cut.jpg'.*cannot be decoded.*truncated"):
        check_image_file(tmp_path / "cut.jpg")
    (tmp_path / "more.jpg").write_bytes(data + b"\x01" * 20000)
    check_image_file(tmp_path / "more.jpg")


def test_a_strip_too_long_to_pad_is_refused_before_the_canvas_is_made():
    strip = Image.new("RGB", (9000, 8))  # 72,000 pixels, but padding makes 81,000,000
    with pytest.raises(ValueError, match=r"'strip': 9000x8 pads to a 9000x9000 square"):
        ml.ImageProcessor(image_size=32, aspect="pad")([strip], names=["strip"])
    assert ml.ImageProcessor(image_size=32, aspect="square")([strip]).shape == (1, 3, 32, 32)
