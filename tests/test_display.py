"""The chapters' display helpers: what they show is what the data says."""

import html
import re

from conftest import random_image

import minillava as ml
from minillava import display


def test_table_escapes_text_keeps_markup_and_puts_notes_under_their_row():
    text = display.table_html(["a", "b"], [["<x>", display.Markup("<b>y</b>")], [["p", "q"], (1, 65)]], ["why", None])
    assert "&lt;x&gt;" in text and "<b>y</b>" in text  # text escaped, Markup kept
    rows = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1])
    assert len(rows) == 3 and 'colspan="2"' in rows[1] and "<i>why</i>" in rows[1]  # the note follows row 1
    assert "p<br>q" in rows[2] and "(1, 65)" in rows[2]  # a list cell: one item per line; a tuple (a shape) as is


def test_code_cells_show_repr_and_cut_long_strings():
    assert html.escape(repr("a\nb")) in display.code("a\nb")  # the newline shows as \n
    cut = display.code("x" * 50, limit=10)
    assert "xxxxxxx..." in cut and "x" * 11 not in cut


def test_mask_boxes_follow_the_labels(tokenizer):
    tpl = ml.get_template("vicuna_v1")
    messages = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]
    out = tpl.tokenize(messages, tokenizer, num_image_tokens=4)
    shown = display.mask_html(out, tokenizer, "t")
    supervised = sum(label != ml.IGNORE_INDEX for label in out["labels"])
    assert f"{len(out['input_ids'])} tokens, {supervised} supervised" in shown
    body = shown.split("</p>", 1)[1]
    assert body.count("background:#c6f6d5") == supervised  # one green box per supervised token
    assert body.count("&lt;image&gt; × 4") == 1  # four image tokens, one box


def test_side_by_side_pastes_left_to_right():
    a, b = random_image(10, 6, seed=1), random_image(5, 9, seed=2)
    canvas = display.side_by_side([a, b], gap=2)
    assert canvas.size == (17, 9)
    assert canvas.getpixel((0, 0)) == a.convert("RGB").getpixel((0, 0))
    assert canvas.getpixel((12, 8)) == b.convert("RGB").getpixel((0, 8))
    assert canvas.getpixel((10, 0)) == (255, 255, 255)  # the gap


def test_question_text_drops_placeholders_and_the_suffix():
    from minillava.evaluation import SHORT_ANSWER

    q = {"messages": [{"role": "user", "content": "Image 1: <image>\nImage 2: <image>\nWhich?" + SHORT_ANSWER}]}
    assert display.question_text(q) == "Which?"
