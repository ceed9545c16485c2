"""The projector, the multimodal merge, forward/loss, generation and checkpoints."""

import pytest
import torch
from conftest import make_model, make_processor, random_image

import minillava as ml
from minillava import IGNORE_INDEX


def chat(question, answer=None):
    msgs = [{"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer else [])


# ---- projector -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n_params", [
    ("linear", 32 * 48 + 48),
    ("mlp2x_gelu", 32 * 48 + 48 + 48 * 48 + 48),
    ("mlp3x_gelu", 32 * 48 + 48 + 2 * (48 * 48 + 48)),
])
def test_projector_shapes_and_sizes(name, n_params):
    proj = ml.build_projector(name, 32, 48)
    assert proj(torch.randn(2, 5, 32)).shape == (2, 5, 48)
    assert sum(p.numel() for p in proj.parameters()) == n_params
    assert proj.kind == name


def test_mlp2x_gelu_is_llavas():
    proj = ml.build_projector("mlp2x_gelu", 4, 6)
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear"]
    assert proj[1].approximate == "none"  # exact GELU, as nn.GELU() in LLaVA
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # = mm_projector.* keys


def test_projector_errors():
    with pytest.raises(ValueError, match="unknown projector 'mlp2x_relu'"):
        ml.build_projector("mlp2x_relu", 4, 4)
    with pytest.raises(ValueError, match="identity' needs equal widths"):
        ml.build_projector("identity", 4, 8)
    assert isinstance(ml.build_projector("identity", 8, 8)[0], torch.nn.Identity)


# ---- the merge and forward -------------------------------------------------------------------------------
def test_image_features_land_at_image_tokens(model, processor):
    img = random_image()
    b = processor(chat("<image>\nWhat color?", "Red."), [img])
    P = model.num_image_tokens
    is_img = b["input_ids"][0] == model.image_token_id
    assert int(is_img.sum()) == P
    embeds = model.embed(b["input_ids"], b["images"])
    expected = model.project(model.encode_images(b["images"]))[0]
    assert torch.equal(embeds[0, is_img], expected)
    text = model.language_model.get_input_embeddings()(b["input_ids"][0, ~is_img])
    assert torch.equal(embeds[0, ~is_img], text)
    assert (b["labels"][0, is_img] == IGNORE_INDEX).all()


def test_batch_with_several_images_and_none(model, processor):
    ims = [random_image(seed=i) for i in range(3)]
    convs = [chat("<image> and <image>: which has more?", "The first."), chat("Hello?", "Hi."),
             chat("<image>\nWhere?", "Top left.")]
    b = processor(convs, [ims[:2], [], ims[2:]])
    assert b["images"].shape[0] == 3
    out = model(**b)
    assert out.logits.shape[:2] == b["input_ids"].shape and torch.isfinite(out.loss)
    # each sample alone gives the same logits at its real positions (right padding)
    for i, (c, im) in enumerate(zip(convs, [ims[:2], [], ims[2:]])):
        one = processor(c, im)
        n = one["input_ids"].shape[1]
        assert torch.allclose(model(**one).logits[0], out.logits[i, :n], atol=1e-5)


def test_loss_only_on_supervised_tokens(model, processor):
    b = processor(chat("<image>\nWhat color?", "Red."), [random_image()])
    full = model(**b)
    fast = model(**b, return_logits=False)
    assert fast.logits is None and torch.allclose(full.loss, fast.loss, atol=1e-6)
    keep = b["labels"][0, 1:] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(full.logits[0, :-1][keep], b["labels"][0, 1:][keep])
    assert torch.allclose(full.loss, manual, atol=1e-6) and full.num_tokens == int(keep.sum())
    supervised = processor.decode(b["labels"][0][b["labels"][0] != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised.strip() == "Red.</s>"


@pytest.mark.slow
def test_training_forward_compiles_to_one_graph(tokenizer, processor):
    """No data-dependent Python values or shapes in the forward: torch.compile traces it without a break."""
    model = make_model(tokenizer).train()
    b = processor([chat("<image>\nWhat color?", "Red."), chat("<image>\nWhere?", "Top left.")],
                  [[random_image(seed=1)], [random_image(seed=2)]])
    eager = model(**b, return_logits=False)  # (transformers installs its hidden-state hooks on the first call)
    explained = torch._dynamo.explain(model)(**b, return_logits=False)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="eager")(**b, return_logits=False)
    assert torch.allclose(compiled.loss, eager.loss) and int(compiled.num_tokens) == int(eager.num_tokens)


@pytest.mark.slow
def test_inductor_training_step_equals_eager(tokenizer, processor):
    """The training forward compiled by inductor (what a GPU run uses), the fused loss inside it: the eager loss
    and gradients."""
    model = make_model(tokenizer).train()
    b = processor([chat("<image>\nWhat color?", "Red."), chat("<image>\nWhere?", "Top left.")],
                  [[random_image(seed=1)], [random_image(seed=2)]])

    def step(net):
        model.zero_grad(set_to_none=True)
        loss = net(**b, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model)
    loss, grads = step(torch.compile(model))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_gradients_reach_projector_and_lm_only(tokenizer, processor):
    model = make_model(tokenizer).train()
    b = processor(chat("<image>\nWhat color?", "Red."), [random_image()])
    model(**b).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert model.language_model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_left_and_right_padding_agree(model, processor):
    convs = [chat("<image>\nWhat color is the circle?"), chat("<image>\nHi")]
    ims = [[random_image(seed=1)], [random_image(seed=2)]]
    right = processor(convs, ims, add_generation_prompt=True, padding_side="right")
    left = processor(convs, ims, add_generation_prompt=True, padding_side="left")
    lr, ll = model(**right).logits, model(**left).logits
    for i in range(2):
        n = int(right["attention_mask"][i].sum())
        assert torch.allclose(lr[i, :n], ll[i, -n:], atol=1e-5)


def test_placeholders_and_images_must_agree(model, processor):
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1 images"):
        processor(chat("<image> vs <image>?", "A."), [random_image()])
    with pytest.raises(ValueError, match="0 '<image>' placeholders but 1 images"):
        processor(chat("What?", "A."), [random_image()])
    one = chat("<image>\nWhat?", "A.")
    with pytest.raises(ValueError, match=r"images\[0\]: a str; with several conversations, images is one list"):
        processor([one, one], ["a.png", "b.png"])  # one image per conversation, but not each in its list
    assert processor([one, one], [[random_image()], [random_image()]])["images"].shape[0] == 2
    b = processor(chat("<image>\nWhat?", "A."), [random_image()])
    with pytest.raises(ValueError, match="1 image placeholders .* but 2 images"):
        model(b["input_ids"], images=torch.cat([b["images"], b["images"]]))
    first = int((b["input_ids"][0] == model.image_token_id).nonzero()[0])
    cut = b["input_ids"][:, first + 3:]  # a prompt that starts inside the run of image tokens
    with pytest.raises(ValueError, match="sample 0: 13 image tokens is not a multiple of the 16"):
        model(cut, images=b["images"])


def test_context_length_is_enforced(model, processor, tokenizer):
    long = " ".join(["shape"] * 300)
    with pytest.raises(ValueError, match="256"):
        processor(chat("<image>\n" + long, "Red."), [random_image()])
    ids = torch.full((1, 300), 5)
    with pytest.raises(ValueError, match="300 tokens .* context of 256"):
        model(ids)


# ---- generation ------------------------------------------------------------------------------------------
def prompts(processor):
    ims = [random_image(seed=s) for s in range(3)]
    convs = [chat("<image>\nWhat color is the circle?"), chat("<image> and <image>: which has more shapes?"),
             chat("Hello")]
    return convs, [ims[:1], ims[1:], []]


def test_cached_generation_equals_uncached(model, processor):
    convs, ims = prompts(processor)
    b = processor(convs, ims, add_generation_prompt=True)
    kw = dict(max_new_tokens=12, eos_token_id=processor.stop_token_ids())
    cached = model.generate(b["input_ids"], b["attention_mask"], b["images"], **kw)
    uncached = model.generate(b["input_ids"], b["attention_mask"], b["images"], use_cache=False, **kw)
    assert cached.shape[1] > 1 and torch.equal(cached, uncached)


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_compiles_once(model, processor, monkeypatch):
    """generate(compile=True): a static KV cache and a compiled one-token step give exactly the eager tokens
    and scores (left padding, images, a row that stops early); a second call of the same shapes compiles
    nothing new; a deep copy decodes with its own weights."""
    import copy

    convs, ims = prompts(processor)
    b = processor(convs, ims, add_generation_prompt=True)
    args = (b["input_ids"], b["attention_mask"], b["images"])
    free = model.generate(*args, max_new_tokens=12)
    stop = next(int(t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[1] and t not in free[0, :k])
    kw = dict(max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    logits = {}
    head = model.language_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, out: logits.setdefault(mode, []).append(out))
    try:
        mode = "eager"
        eager = model.generate(*args, **kw)
        mode = "compiled"
        torch._dynamo.utils.counters.clear()
        assert torch.equal(model.generate(*args, compile=True, **kw), eager)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1  # steps of fixed shapes and strides
    finally:
        hook.remove()
    k = int((eager[0] == stop).nonzero()[0])
    assert (eager[0, k + 1:] == 0).all() and eager.shape[1] > k + 1  # row 0 stopped early, row 1 went on
    assert len(logits["compiled"]) == len(logits["eager"]) > 1  # the same scores at every step, not just tokens
    for a, c in zip(logits["eager"], logits["compiled"]):
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(model.generate(*args, compile=True, **kw), eager)
    assert not torch._dynamo.utils.counters["stats"].get("unique_graphs")  # no recompilation
    assert not torch._dynamo.utils.counters["graph_break"]  # one whole graph per step
    from minillava import decoding
    from minillava.decoding import _STATIC_CACHES

    kept = _STATIC_CACHES[model][2]  # later calls that fit reuse the cache, emptied (fixed addresses)
    assert torch.equal(model.generate(*args, compile=True, max_new_tokens=4), eager[:, :4])
    assert _STATIC_CACHES[model][2] is kept
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a cache filled under autocast holds other dtypes
        model.generate(*args, compile=True, max_new_tokens=2)
    assert torch.equal(model.generate(*args, compile=True, **kw), eager)
    twin = copy.deepcopy(model)  # (nothing compiled travels with the model)
    with torch.no_grad():
        twin.language_model.get_output_embeddings().weight.mul_(-1)
    assert torch.equal(twin.generate(*args, compile=True, **kw), twin.generate(*args, **kw))
    seen, real = [], decoding._decode
    monkeypatch.setattr(decoding, "_decode", lambda *a: seen.append(a[3]) or real(*a))
    model.generate(*args, compile=True, **kw)  # the eager prefill counts positions over real tokens only
    assert torch.equal(seen[0], (b["attention_mask"].cumsum(-1) - 1).clamp(min=0))  # (RoPE hides a shift)
    with pytest.raises(ValueError, match="must be a StaticCache"):
        model.generate(*args, compile=True, use_cache=False, **kw)


def test_batched_left_padded_equals_one_by_one(model, processor):
    convs, ims = prompts(processor)
    b = processor(convs, ims, add_generation_prompt=True)
    assert (b["attention_mask"][:, 0] == 0).any()  # some rows really are left-padded
    batched = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=12)
    for i, (c, im) in enumerate(zip(convs, ims)):
        one = processor(c, im, add_generation_prompt=True)
        alone = model.generate(one["input_ids"], one["attention_mask"], one["images"], max_new_tokens=12)
        assert torch.equal(alone[0], batched[i, :alone.shape[1]])


def test_sampling_is_seeded_and_top_p_narrows(model, processor):
    b = processor(chat("<image>\nWhat?"), [random_image()], add_generation_prompt=True)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=10,
                              **{"temperature": 1.0, **kw}, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=10)
    assert torch.equal(sample(3, top_p=1e-6), greedy)  # the nucleus of mass ~0 is the argmax alone
    assert torch.equal(sample(3, temperature=1e-45), greedy)  # (logits / 1e-45 overflow; their shift does not)
    with pytest.raises(ValueError, match="a `cache` with use_cache=False"):
        list(model.stream(b["input_ids"], images=b["images"], cache=ml.decoding.new_cache(model), use_cache=False))


def test_generation_stops_at_eos_and_pads(model, processor):
    b = processor(prompts(processor)[0][:2], prompts(processor)[1][:2], add_generation_prompt=True)
    free = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=6)
    stop = int(free[0, 1])  # pretend row 0's second token is the end of turn
    out = model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=6,
                         eos_token_id=stop, pad_token_id=0)
    assert int(out[0, 1]) == stop and (out[0, 2:] == 0).all()


def test_generation_respects_context(model):
    with pytest.raises(ValueError, match="no room"):
        model.generate(torch.full((1, 256), 5), max_new_tokens=4)
    assert model.generate(torch.full((1, 250), 5), max_new_tokens=50).shape[1] <= 6


# ---- checkpoints -----------------------------------------------------------------------------------------
def test_save_and_load_roundtrip(tmp_path, model, processor):
    ml.save(model, processor, tmp_path / "ckpt")
    loaded, proc = ml.load(tmp_path / "ckpt", device="cpu")
    b = proc(chat("<image>\nWhat?", "Red."), [random_image()])
    assert torch.equal(loaded(**b).logits, model(**b).logits)
    assert proc.template.name == processor.template.name and proc.num_image_tokens == processor.num_image_tokens
    assert not any(p.name.endswith(".bin") or p.name.endswith(".pt") for p in (tmp_path / "ckpt").iterdir())


def test_saved_config_does_not_name_the_folders_of_its_backbones(tmp_path, tokenizer):
    m = make_model(tokenizer)
    m.language_model.config._name_or_path = str(tmp_path / "my-lm")  # as from_pretrained sets it
    m.vision_tower.model.config._name_or_path = str(tmp_path / "my-clip")
    ml.save(m, make_processor(tokenizer, m), tmp_path / "ckpt")
    assert str(tmp_path) not in (tmp_path / "ckpt" / "config.json").read_text()
    assert ml.load(tmp_path / "ckpt")[0].config == m.config
    ml.export_hf(m, make_processor(tokenizer, m), tmp_path / "hf")  # nor does transformers' Llava export
    assert str(tmp_path) not in (tmp_path / "hf" / "config.json").read_text()


def test_broken_checkpoints_get_clear_errors(tmp_path, tokenizer, model):
    with pytest.raises(FileNotFoundError, match="model 'nowhere': no such zoo component or folder"):
        ml.load("nowhere")
    ml.save(model, make_processor(tokenizer, model), tmp_path / "ok")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "ok" / "model.safetensors")
    state.pop("projector.0.weight")
    save_file(state, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(ValueError, match="missing: projector.0.weight"):
        ml.load(tmp_path / "ok")
    other = make_model(tokenizer)
    other.projector = ml.build_projector("mlp2x_gelu", 32, 48)
    other.projector[2] = torch.nn.Linear(48, 48, bias=True)
    state = {k: v for k, v in other.state_dict().items()}
    state["projector.2.weight"] = torch.zeros(7, 48)
    save_file(state, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(ValueError, match="wrong shape: projector.2.weight"):
        ml.load(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        ml.load(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ml.load(tmp_path / "ok")


def test_failed_save_leaves_nothing_half_written(tmp_path, model):
    class Exploding:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    ml.save(model, None, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        ml.save(model, Exploding(), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_siglip_model_runs(tokenizer):
    model = make_model(tokenizer, kind="siglip")
    processor = make_processor(tokenizer, model)
    b = processor(chat("<image>\nWhat?", "Red."), [random_image()])
    assert model.num_image_tokens == 16 and torch.isfinite(model(**b).loss)


def test_processor_takes_one_image_as_it_takes_a_list(processor, tmp_path):
    img = random_image()
    img.save(tmp_path / "one.png")
    conv = chat("<image>\nWhat color?", "Red.")
    as_list = processor(conv, [img])
    for one in (img, tmp_path / "one.png", str(tmp_path / "one.png")):
        b = processor(conv, one)
        assert torch.equal(b["input_ids"], as_list["input_ids"]) and torch.equal(b["images"], as_list["images"])
    with pytest.raises(ValueError, match="no conversation given"):
        processor([])
    with pytest.raises(ValueError, match=r"sample 'q7, turn 0': 1 '<image>' placeholders but 0 images"):
        processor([conv], [[]], sample_ids=["q7, turn 0"])


@pytest.mark.parametrize("grid, factor", [(4, 2), (6, 3), (8, 2)])
def test_pixel_shuffle_puts_each_block_of_patches_into_one_token(grid, factor):
    from minillava.projector import pixel_shuffle

    n, c = 2, 3
    features = torch.randn(n, grid * grid, c)
    out = pixel_shuffle(features, factor)
    side = grid // factor
    assert out.shape == (n, side * side, c * factor * factor)
    patches = features.reshape(n, grid, grid, c)
    for k in range(side * side):  # new tokens in reading order of the blocks; a block's values, in some order
        row, col = divmod(k, side)
        block = patches[:, row * factor:(row + 1) * factor, col * factor:(col + 1) * factor].reshape(n, -1)
        assert torch.equal(out[:, k].sort(dim=-1).values, block.sort(dim=-1).values)
    with pytest.raises(ValueError, match="not a square grid"):
        pixel_shuffle(torch.randn(1, 10, c), 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        pixel_shuffle(torch.randn(1, 16, c), 3)


def test_a_text_only_training_batch_still_uses_every_trainable_weight(model, processor):
    """DDP and FSDP need each process's micro-batch to use the weights every other one uses: a batch without
    images adds 0 x a blank image's projection (or, with the tower training, its encoding), as LLaVA does; so it
    gives gradients, all zero, to exactly the weights an image batch gives gradients to, and adds nothing."""
    text = processor(chat("How many sides does a triangle have?", "3."))
    image = processor(chat("<image>\nWhat color?", "Red."), [random_image()])

    def weights_used(batch) -> dict:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        for tower_trains in (False, True):
            model.vision_tower.frozen = not tower_trains
            model.vision_tower.requires_grad_(tower_trains)
            by_image, by_text = weights_used(image), weights_used(text)
            assert set(by_text) == set(by_image)
            assert any(n.startswith("vision_tower") for n in by_text) == tower_trains
            assert not any(by_text[n].any() for n in by_text if not n.startswith("language_model"))
            ids = text["input_ids"]  # (still training: the term is there, and adds exactly nothing)
            assert torch.equal(model.embed(ids).detach(), model.language_model.get_input_embeddings()(ids).detach())
    finally:
        model.vision_tower.frozen = True
        model.vision_tower.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        model.eval()
