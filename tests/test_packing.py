"""Padding-free packing: samples laid end to end in one row give the losses and gradients of the padded batch."""

import json

import pytest
import torch
from conftest import random_image, save_world

from minillava.templates import IGNORE_INDEX
from minillava.training import TrainConfig, train
from minillava.training.data import LazyData


def conversations():
    """Three samples of different lengths: one image, no image, two images over two turns."""
    return [
        ([{"role": "user", "content": "<image>\nWhat color is the circle?"},
          {"role": "assistant", "content": "Red."}], [random_image(40, 30, 0)]),
        ([{"role": "user", "content": "How many sides does a triangle have?"},
          {"role": "assistant", "content": "Three, and a square has four."}], []),
        ([{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "A blue square."},
          {"role": "user", "content": "<image>\nAnd this one?"}, {"role": "assistant", "content": "Two stars."}],
         [random_image(24, 50, 1), random_image(32, 32, 2)]),
    ]


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), int(out.num_tokens), grads


def test_pack_lays_samples_end_to_end(processor):
    samples = [processor.encode(m, imgs) for m, imgs in conversations()]
    packed = processor.pack(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and packed["attention_mask"] is None
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    assert packed["position_ids"][0, starts].tolist() == [0, 0, 0]  # each sample starts again at 0
    assert packed["position_ids"][0, -1] == lengths[-1] - 1
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()  # no sample learns the next one's first token
    assert packed["images"].shape[0] == 3


def test_packed_loss_and_gradients_equal_padded(model, processor):
    samples = [processor.encode(m, imgs) for m, imgs in conversations()]
    model.train()  # dropout is 0 in these configs: train mode changes nothing but is how training runs
    padded = processor.collate(samples)
    packed = processor.pack(samples)
    assert padded["attention_mask"].eq(0).any()  # the padded batch does carry padding
    try:
        a_loss, a_n, a_grads = loss_and_grads(model, padded)
        b_loss, b_n, b_grads = loss_and_grads(model, packed)
    finally:
        model.eval().zero_grad(set_to_none=True)
    assert a_n == b_n > 0
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    assert a_grads.keys() == b_grads.keys() and a_grads
    for name in a_grads:
        torch.testing.assert_close(b_grads[name], a_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_samples_do_not_see_each_other(model, processor):
    """Changing the first sample changes nothing in the second's logits: the mask keeps them apart."""
    samples = [processor.encode(m, imgs) for m, imgs in conversations()]
    other = processor.encode([{"role": "user", "content": "<image>\nWhat shape is it?"},
                              {"role": "assistant", "content": "A small green star."}], [random_image(40, 30, 5)])
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    with torch.no_grad():
        a = model(**processor.pack(samples[:2])).logits[0, n0:]
        b = model(**processor.pack([other, samples[1]])).logits[0, len(other["input_ids"]):]
    assert a.shape[0] == b.shape[0] == n1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("packworld")
    paths = save_world(d, tokenizer, 8)
    records = []
    for i in range(8):
        turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A circle."}]
        more = [{"from": "human", "value": "And its color?"}, {"from": "gpt", "value": "Red " * (1 + i % 3)}]
        turns += more * (i % 3)
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hello?"},
                                                    {"from": "gpt", "value": "Hello."}]})
    (d / "data.json").write_text(json.dumps(records))
    return {**paths, "data": str(d / "data.json")}


@pytest.mark.parametrize("lazy", [False, True])
def test_packed_training_gives_the_losses_of_padded(world, tmp_path, lazy):
    common = dict(stage=2, data=world["data"], images=world["images"], vision=world["vision"], lm=world["lm"],
                  batch_size=4, micro_batch_size=2, max_steps=3, lr=1e-3, progress=False, lazy_data=lazy,
                  num_workers=0)
    padded = train(TrainConfig(out=str(tmp_path / "padded"), **common))
    packed = train(TrainConfig(out=str(tmp_path / "packed"), packing=True, **common))
    losses = [[m["loss"] for m in r.metrics] for r in (padded, packed)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)


def test_lazy_packed_micro_batches_carry_positions(world, processor):
    data = LazyData.open(world["data"], world["images"]).encode_with(processor)
    order = data.order(0, 0, 2, False)
    step = next(data.steps(order, 0, 1, batch=4, micro=2, packing=True))
    inputs = data.inputs(step[0], None, "cpu")
    assert "attention_mask" not in inputs and inputs["position_ids"].shape == inputs["input_ids"].shape
    assert inputs["input_ids"].shape[0] == 1
