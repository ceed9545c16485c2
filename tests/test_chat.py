"""The chat assistant: multi-turn, multi-image chats with KV-cache reuse, stopping, context policies, bad input,
export, the notebook widget, the command line and the benchmark's report (its timings only against a model
slowed by a known amount per token)."""

import dataclasses
import datetime
import html
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, random_image

import minillava as ml
from minillava.chat import ChatSession, common_prefix
from minillava.data.records import parse_record

REPO = Path(__file__).resolve().parent.parent


def chat_of(model, processor, **kw):
    kw = {"system": "", "max_new_tokens": 10, **kw}  # no system prompt: 4 turns fit the tiny 256-token context
    return ChatSession(model, processor, **kw)


def scripted_model(tokenizer, text: str, end: list[int] = ()):
    """A tiny LLaVA that answers `text` (then the ids `end`) to any prompt ending in ":", as vicuna_v1's does.

    Its layers add nothing to the residual stream, so each next token depends on the current token only, and its
    LM head maps each token of the script to the next one. The script's tokens must all differ.
    """
    script = [tokenizer.convert_tokens_to_ids(":"), *tokenizer.encode(text, add_special_tokens=False), *end]
    assert len(set(script)) == len(script), tokenizer.convert_ids_to_tokens(script)
    model = make_model(tokenizer, seed=1)
    lm = model.language_model
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head.zero_()
        for a, b in zip(script, script[1:]):
            head[b] = emb[a] / emb[a].norm() * 50
    return model


# ---- the conversation and its cache --------------------------------------------------------------------------
def test_cached_turns_match_full_reprefill(model, processor):
    """Greedy answers are token for token those of re-prefilling everything, across turns that add images."""
    imgs = [random_image(40, 30, 0), random_image(24, 50, 1), random_image(32, 32, 2)]
    script = [("What color is the circle?", imgs[:1]), ("Where is it?", []),
              ("Which image has more shapes?", imgs[1:]), ("How many shapes are there?", [])]
    runs = {}
    for reuse in (True, False):
        chat = chat_of(model, processor, reuse_cache=reuse)
        runs[reuse] = [(chat.ask(q, images=im), dict(chat.stats)) for q, im in script]
    for (a_cached, s_cached), (a_full, s_full) in zip(runs[True], runs[False]):
        assert a_cached == a_full
        assert s_cached["new_token_ids"] == s_full["new_token_ids"]
        assert s_cached["prompt_tokens"] == s_full["prompt_tokens"] == s_full["prefilled_tokens"]
    stats = [s for _, s in runs[True]]
    assert [s["images_encoded"] for s in stats] == [1, 0, 2, 0]  # old images are never encoded again
    assert stats[0]["reused_tokens"] == 0
    for before, now in zip(stats, stats[1:]):  # each turn prefills only what the last one did not hold
        assert now["reused_tokens"] >= before["prompt_tokens"] and now["prefilled_tokens"] < now["prompt_tokens"]

    # and both equal a plain generate over the full prompt, written out by hand
    history = chat.history
    msgs = [{"role": m["role"], "content": m["content"]} for m in history[:-1]]
    ids = ml.get_template("vicuna_v1").tokenize([{"role": "system", "content": ""}] + msgs, processor.tokenizer,
                                                add_generation_prompt=True, num_image_tokens=16)["input_ids"]
    pixels = processor.image_processor([im for m in history for im in m.get("images", [])])
    out = model.generate(torch.tensor([ids]), images=pixels, max_new_tokens=10,
                         eos_token_id=processor.stop_token_ids())
    assert out[0].tolist() == stats[-1]["new_token_ids"]


def test_history_and_placeholders(model, processor, tmp_path):
    a, b = random_image(40, 30, 0), random_image(24, 50, 1)
    path = tmp_path / "b.png"
    b.save(path)
    chat = chat_of(model, processor, max_new_tokens=3)
    chat.ask("What is this?", images=[a])
    chat.ask("Compare <image> with <image>.", images=[path.read_bytes(), str(path)])
    h = chat.history
    assert [m["role"] for m in h] == ["user", "assistant"] * 2
    assert h[0]["content"] == "<image>\nWhat is this?" and h[0]["images"] == [a]
    assert h[2]["content"] == "Compare <image> with <image>." and len(h[2]["images"]) == 2
    assert chat.messages[0] == {"role": "system", "content": ""}
    chat.reset()
    chat.ask("What is this? <image>", images=[a])  # stored as a one-image chat renders it, so that ...
    first = chat.stats["prompt_tokens"]
    assert chat.history[0]["content"] == "<image>\nWhat is this?"
    chat.ask("And this?", images=[b])  # ... a second image does not re-render the answered turn
    assert chat.stats["reused_tokens"] >= first - 1
    chat.reset()
    assert chat.history == [] and chat.ask("Hello?")  # text-only chats work too


def test_streaming_joins_to_the_answer(model, processor):
    img = random_image()
    asked = chat_of(model, processor).ask("What color is the circle?", images=[img])
    pieces = list(chat_of(model, processor).stream("What color is the circle?", images=[img]))
    assert "".join(pieces) == asked and len(pieces) > 1
    answers = []
    for reuse in (True, False):  # an iterator closed early keeps what it said, and the chat goes on from there
        chat = chat_of(model, processor, reuse_cache=reuse)
        pieces = chat.stream("What color is the circle?", images=[img])
        first = next(pieces)
        pieces.close()
        assert chat.history[1]["content"] == first.strip()
        answers.append(chat.ask("Where is it?"))
    assert answers[0] == answers[1]


def test_a_stream_left_open_ends_where_the_next_question_starts(model, processor):
    """A partly read answer that is dropped only after later turns (`del` of the iterator) never writes its old
    conversation back over theirs: the next question closes it, and the cache stays the conversation's."""
    img = random_image()
    answers, histories = [], []
    for reuse in (True, False):
        chat = chat_of(model, processor, reuse_cache=reuse)
        pieces = chat.stream("How many shapes are there?", images=[img])
        first = next(pieces)
        chat.ask("What color is the circle?")
        del pieces
        answers.append(chat.ask("Where is it?"))
        histories.append([m["content"] for m in chat.history])
        assert histories[-1][:2] == ["<image>\nHow many shapes are there?", first.strip()]
        assert len(histories[-1]) == 6
    assert answers[0] == answers[1] and histories[0] == histories[1]
    chat = chat_of(model, processor)
    pieces = chat.stream("How many shapes are there?", images=[img])
    next(pieces)
    chat.reset()  # closes it too: the reset session stays empty
    del pieces
    assert chat.history == []


def test_an_answer_with_a_special_tokens_text_does_not_break_the_chat(tokenizer, processor):
    """The model may spell "<s>" out of ordinary tokens; the template could not carry that text back (it would
    read as the BOS token), so the turn keeps the answer without it and the chat goes on."""
    ids = [i for piece in ("Mark", "<", "s", ">") for i in tokenizer.encode(piece, add_special_tokens=False)]
    model = scripted_model(tokenizer, "", end=ids + [tokenizer.eos_token_id])
    chat = chat_of(model, processor, max_new_tokens=12)
    assert chat.ask("What?") == "Mark<s>"
    assert chat.history[1]["content"] == "Mark"
    assert chat.ask("Again?") == "Mark<s>" and chat.stats["reused_tokens"] == 0  # the cache was not kept


def test_an_interrupted_answer_keeps_what_was_shown(model, processor, monkeypatch):
    """An exception inside a step (Ctrl-C during the model's work) keeps the turn with the text already shown and
    starts the next turn's cache afresh; one before any text drops the turn."""
    img = random_image()
    reference = chat_of(model, processor)
    full = reference.stream("How many shapes are there?", images=[img])
    first = next(full)
    full.close()
    expected = reference.ask("Where is it?")
    real = type(model).stream

    def interrupted_after(n):
        def stream(self, *args, **kw):
            for i, token in enumerate(real(self, *args, **kw)):
                if i == n:
                    raise KeyboardInterrupt
                yield token
        return stream

    chat = chat_of(model, processor)
    monkeypatch.setattr(type(model), "stream", interrupted_after(0))
    with pytest.raises(KeyboardInterrupt):
        chat.ask("How many shapes are there?", images=[img])
    assert chat.history == []
    monkeypatch.setattr(type(model), "stream", interrupted_after(len(reference.stats["new_token_ids"]) - 1))
    pieces = chat.stream("How many shapes are there?", images=[img])
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in pieces:
            shown.append(piece)
    assert shown
    assert chat.history[1]["content"] == "".join(shown).strip() and chat.history[1]["content"].startswith(first)
    monkeypatch.setattr(type(model), "stream", real)
    again = chat.ask("Where is it?")
    assert chat.stats["reused_tokens"] == 0 and (again == expected) == (chat.history[1] == reference.history[1])


def test_streaming_decodes_characters_split_across_tokens(tokenizer, processor):
    model = scripted_model(tokenizer, "Red\U0001F534.", end=[tokenizer.eos_token_id])  # 🔴 is 4 byte tokens
    chat = chat_of(model, processor)
    pieces = list(chat.stream("What color?"))
    assert "".join(pieces) == "Red\U0001F534." and not any("\ufffd" in p for p in pieces)
    assert chat.stats["new_token_ids"][-1] == tokenizer.eos_token_id
    cut = chat_of(model, processor, max_new_tokens=5)  # "Red" and 2 of the 4 bytes: U+FFFD, as transformers
    assert cut.ask("What color?").startswith("Red\ufffd")


def test_stop_token_and_cache_accounting(tokenizer, processor):
    model = scripted_model(tokenizer, "The circle.", end=[tokenizer.eos_token_id])  # vicuna's "</s>" is EOS
    chat = chat_of(model, processor)
    assert chat.ask("What is it?") == "The circle."
    first = chat.stats["prompt_tokens"]
    assert chat.ask("And now?") == "The circle."
    assert chat.stats["reused_tokens"] == first  # the answer re-tokenizes as " The", not "The": cut there
    assert "</s>" not in chat.history[1]["content"]


def test_multi_token_stop_string_never_leaks(tokenizer, processor):
    """A template whose separator "[END]" is five tokens: the model writes it, and more after it."""
    model = scripted_model(tokenizer, "The circle.[END]USER")
    template = dataclasses.replace(ml.get_template("vicuna_v1"), name="vicuna_end", answer=(" ", "[END]"))
    chat = chat_of(model, processor, template=template)
    pieces = list(chat.stream("What is it?"))
    assert "".join(pieces) == "The circle." and not any("[" in p for p in pieces)
    assert tokenizer.decode(chat.stats["new_token_ids"]).endswith("[END]")  # it stopped right there
    assert chat.ask("Again?") == "The circle."


def test_common_prefix_never_cuts_an_image():
    image = [-7] * 4
    assert common_prefix([1, 2, *image[:2]], [1, 2, *image, 3]) == 2
    assert common_prefix([1, 2, *image, 9], [1, 2, *image, 3]) == 6
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 2  # one token is always prefilled


# ---- context ---------------------------------------------------------------------------------------------------
def prompt_length(processor, messages: list[dict], generation_prompt: bool = True) -> int:
    """Tokens of `messages` as `chat_of`'s sessions render them (vicuna_v1, 16 tokens an image)."""
    return len(ml.get_template("vicuna_v1").tokenize(messages, processor.tokenizer, num_image_tokens=16,
                                                     add_generation_prompt=generation_prompt)["input_ids"])


def context_numbers(error: Exception) -> tuple[int, ...]:
    """A context error -> (needed by the turn, for its question, for its answer, left, used so far)."""
    found = re.search(r"this turn needs (\d+) tokens \((\d+) for the question and its \d+ image\(s\) of 16 tokens "
                      r"each, (\d+) for the answer\), but only (\d+) of the model's 256 are left after the (\d+) of "
                      r"the conversation so far", str(error))
    assert found, str(error)
    return tuple(map(int, found.groups()))


def test_context_error_says_what_is_needed_and_left(model, processor):
    chat = chat_of(model, processor, max_new_tokens=4)
    img = random_image()
    chat.ask("Describe them.", images=[img] * 8)
    before = chat.history
    with pytest.raises(ValueError, match="context_policy='drop_oldest'") as err:
        chat.ask("And these?", images=[img] * 6)
    need, question, room, left, used = context_numbers(err.value)
    full = prompt_length(processor, chat.messages + [{"role": "user", "content": "<image>\n" * 6 + "And these?"}])
    assert used == prompt_length(processor, chat.messages, generation_prompt=False)
    assert question == full - used and room == 4 and need == question + room
    assert full > 256 and left == 256 - used < need
    assert chat.history == before and chat.ask("What now?")


def test_context_fits_the_prompt_and_the_answer(model, processor):
    """A turn fits when its prompt T and max_new_tokens fill at most the context: exactly full is asked, one token
    more is refused and changes nothing (the next turn answers as a fresh re-prefill does); "left" is never negative,
    even once the conversation so far re-tokenizes longer than the context."""
    img = random_image()
    chat, fresh = (chat_of(model, processor, reuse_cache=reuse) for reuse in (True, False))
    for c in (chat, fresh):
        c.ask("Describe them.", images=[img] * 8)
    T = prompt_length(processor, chat.messages + [{"role": "user", "content": "And now?"}])
    before, stats = chat.history, dict(chat.stats)
    chat.max_new_tokens = 256 - T + 1
    with pytest.raises(ValueError, match=r"reset\(\) the chat") as err:
        chat.ask("And now?")
    need, question, room, left, used = context_numbers(err.value)
    assert question + used == T and room == 256 - T + 1 and need == left + 1 == room + question
    assert chat.history == before and chat.stats == stats

    chat.max_new_tokens = fresh.max_new_tokens = 256 - T  # exactly full: T + max_new_tokens == 256
    answer = chat.ask("And now?")
    assert chat.stats["prompt_tokens"] == T and chat.stats["reused_tokens"] > 0
    assert len(chat.stats["new_token_ids"]) == 256 - T  # the answer ran to the last position of the context
    assert answer == fresh.ask("And now?") and chat.stats["new_token_ids"] == fresh.stats["new_token_ids"]

    before, stats = chat.history, dict(chat.stats)
    chat.max_new_tokens = 1
    with pytest.raises(ValueError) as err:  # the answer's U+FFFD pieces re-tokenize as more tokens than it took
        chat.ask("More?")
    *_, left, used = context_numbers(err.value)
    assert used == prompt_length(processor, chat.messages, generation_prompt=False) > 256 and left == 0
    assert chat.history == before and chat.stats == stats
    chat.reset()
    chat.ask("More?")
    assert len(chat.history) == 2 and chat.stats["prompt_tokens"] + 1 <= 256


def test_drop_oldest_forgets_whole_turns_and_their_images(model, processor):
    imgs = [random_image(32, 32, i) for i in range(12)]
    runs = {}
    for reuse in (True, False):
        chat = chat_of(model, processor, system="Be brief.", max_new_tokens=8, context_policy="drop_oldest",
                       reuse_cache=reuse)
        answers, dropped = [], 0
        for i in range(4):
            answers.append(chat.ask(f"Scene {i}?", images=imgs[3 * i:3 * i + 3]))
            dropped += chat.stats["dropped_turns"]
            assert chat.stats["prompt_tokens"] + 8 <= 256
        runs[reuse] = answers, chat.history
    (answers, history), (full_answers, _) = runs[True], runs[False]
    assert answers == full_answers  # the shifted conversation is re-read correctly from the cache
    assert dropped >= 1 and history[0]["content"].endswith(f"Scene {dropped}?")
    assert [im for m in history[::2] for im in m["images"]] == imgs[3 * dropped:]
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError, match="even with all older turns dropped"):
        chat.ask("Too many?", images=imgs * 2)
    assert chat.history == history


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_leaves_the_session_usable(model, processor, tmp_path):
    img = random_image()
    reference = chat_of(model, processor)
    expected = [reference.ask("What is it?", images=[img]), reference.ask("Where?")]
    chat = chat_of(model, processor)
    assert chat.ask("What is it?", images=[img]) == expected[0]
    before, stats = chat.history, dict(chat.stats)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="bad.png': not an image file"):
        chat.ask("And this?", images=[tmp_path / "bad.png"])
    with pytest.raises(FileNotFoundError, match="missing.png': not found"):
        chat.ask("And this?", images=[str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1 images"):
        chat.stream("Compare <image> and <image>.", images=[img])
    with pytest.raises(ValueError, match="question: empty"):
        chat.ask("   ", images=[img])
    with pytest.raises(TypeError, match="question: a list; ask with the text"):
        chat.ask([{"type": "text", "text": "What is it?"}], images=[img])
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        chat.ask("And this?", images=[tmp_path])
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens 0"), (dict(temperature=-1.0), "temperature -1"),
                       (dict(temperature=float("nan")), "temperature nan"), (dict(top_p=0.0), "top_p 0")):
        with pytest.raises(ValueError, match=match):
            ChatSession(model, processor, **bad)
    with pytest.raises(ValueError, match="context_policy"):
        ChatSession(model, processor, context_policy="truncate")
    with pytest.raises(ValueError, match="system: holds '<image>'; images go with a question"):
        ChatSession(model, processor, system="You see <image>.")
    with pytest.raises(ValueError, match="system: holds '</s>', the text of a special token"):
        ChatSession(model, processor, system="End with </s>.")
    with pytest.raises(TypeError, match="system: a int"):
        ChatSession(model, processor, system=123)
    with pytest.raises(ValueError, match="question: holds '</s>', the text of a special token"):
        chat.ask("What is </s>?")
    assert chat.history == before and chat.stats == stats
    assert chat.ask("Where?") == expected[1]  # as if the bad questions had never been asked


def test_to_llava_json_is_a_valid_record(model, processor, tmp_path):
    path = tmp_path / "a.png"
    random_image(40, 30, 0).save(path)
    chat = chat_of(model, processor, max_new_tokens=4)
    with pytest.raises(ValueError, match="no answered turn"):
        chat.to_llava_json()
    chat.ask("What is it?", images=[str(path)])
    chat.ask("Which has more shapes?", images=[random_image(24, 50, 1)])
    record = chat.to_llava_json(id="c1", image_dir=tmp_path)
    assert record["image"][0] == "a.png" and re.fullmatch(r"image-\d+\.png", record["image"][1])
    parsed = parse_record(record, tmp_path, "chat")  # checks the in-memory image was written there
    assert parsed.id == "c1" and parsed.messages == chat.messages and len(parsed.images) == 2


# ---- the notebook widget -----------------------------------------------------------------------------------
def test_widget_handlers(model, processor):
    pytest.importorskip("ipywidgets")
    from minillava.widget import ChatWidget, transcript_html

    example = random_image(32, 32, 3)
    widget = ChatWidget(chat_of(model, processor, max_new_tokens=4), examples={"noise": example})
    png = io.BytesIO()
    random_image().save(png, format="PNG")

    def upload(name, data):  # one file as ipywidgets 8's FileUpload holds it
        return {"name": name, "type": "", "size": len(data), "content": memoryview(data),
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}

    widget.upload.value = (upload("notes.txt", b"hello"),)  # through the observer, as in a browser
    status = html.unescape(widget.status.value)
    assert "upload 'notes.txt': not an image file" in status and widget.pending == []
    assert "BytesIO" not in status and widget.upload.value == ()
    widget.on_upload({"new": {"scan.pdf": {"metadata": {"type": "application/pdf"}, "content": b"%PDF-1.4"}}})  # 7.x
    status = html.unescape(widget.status.value)
    assert "upload 'scan.pdf': not an image" in status and "BytesIO" not in status and widget.pending == []
    widget.on_upload({"new": (upload("shape.png", png.getvalue()),)})
    widget.picker.value = "noise"
    assert [name for name, _ in widget.pending] == ["shape.png", "noise"]
    widget.question.value = "Which image has more shapes?"
    widget.on_send()
    history = widget.session.history
    assert len(history) == 2 and len(history[0]["images"]) == 2 and widget.pending == []
    assert widget.history.value == transcript_html(widget.session)
    assert widget.history.value.count("data:image/png;base64,") == 2
    assert html.escape(history[1]["content"]) in widget.history.value
    widget.on_send()  # an empty question: a message, nothing asked
    assert "question: empty" in widget.status.value and len(widget.session.history) == 2
    widget.on_reset()
    assert widget.session.history == [] and "no conversation yet" in widget.history.value


# ---- the command line --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    ml.save(model, processor, folder)
    random_image().save(folder.parent / "a.png")
    (folder.parent / "bad.png").write_bytes(b"garbage")
    return folder


def test_cli_through_a_pipe(saved_model):
    d = saved_model.parent
    lines = ["What color is the circle?", f"/image {d / 'missing.png'}", f"/image {d / 'bad.png'}",
             f"/image {d / 'a.png'}", "Where is it?", "/reset", "Compare <image> and <image>.", "Describe it.",
             "/bogus", ""]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "minillava", "chat", "--model", str(saved_model), "--image",
                           str(d / "a.png"), "--max-new-tokens", "4"], input="\n".join(lines), text=True,
                          capture_output=True, timeout=120, env=env, cwd=d)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 3 and "(conversation cleared)" in done.stdout
    for message in ["missing.png': not found", "bad.png': not an image file",
                    "2 '<image>' placeholders but 0 images", "unknown command '/bogus'"]:
        assert message in done.stderr


def test_cli_quit_and_bad_model(saved_model, monkeypatch, capsys):
    from minillava.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi?\n/quit\nNever read?\n"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 1
    assert main(["chat", "--model", str(saved_model.parent / "nope")]) == 2
    assert "nope': no such zoo component or folder" in capsys.readouterr().err


# ---- the benchmark's report ------------------------------------------------------------------------------------
def test_chat_ttft_times_the_prefill_of_each_way(model, processor, monkeypatch, capsys):
    """With the language model made to take 4 ms per token it reads, each reported time covers the prefill of
    the prompt its way reads before the first token: all of it when re-sent, only what the cache lacks in the
    session; so at turn 2 the session is faster by at least the turn-1 prompt the cache holds."""
    import json
    import time

    from minillava.tools import bench

    per_token, reads = 0.004, []

    def slow(module, args, kwargs):
        reads.append(kwargs["inputs_embeds"].shape[1])
        time.sleep(per_token * reads[-1])

    handle = model.language_model.get_decoder().register_forward_pre_hook(slow, with_kwargs=True)
    try:
        result = bench.chat_ttft(model, processor, random_image(), turns=2, repeats=1, max_new_tokens=3)
    finally:
        handle.remove()
    first = prompt_length(processor, [{"role": "user", "content": "<image>\n" + bench.QUESTIONS[0]}])
    prompt, prefilled = result["prompt_tokens_turn_2"], result["prefilled_tokens_turn_2"]
    # the prefills, in order: the warm-up's turn 1, then re-sent and session turn 1, re-sent and session turn 2
    assert [n for n in reads if n > 1] == [first, first, first, prompt, prefilled]
    assert prompt > first and prefilled <= prompt - first  # the session's cache holds turn 1's prompt
    assert result["reprefill_turn_1_s"] >= per_token * first and result["session_turn_1_s"] >= per_token * first
    assert result["reprefill_turn_2_s"] >= per_token * prompt and result["session_turn_2_s"] >= per_token * prefilled
    assert result["session_turn_2_s"] < result["reprefill_turn_2_s"] - 0.5 * per_token * first
    assert result["ratio_turn_2"] == pytest.approx(result["session_turn_2_s"] / result["reprefill_turn_2_s"])

    # `minillava bench --only chat_ttft` runs it on the benchmark's model
    monkeypatch.setattr(bench, "bench_model", lambda: (model, processor, "the test's tiny model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert bench.main(["--only", "chat_ttft", "--turns", "2", "--repeats", "1", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)["chat_ttft"]
    assert ran["model"] == "the test's tiny model" and ran["turns"] == 2 and ran["repeats"] == 1
    assert ran["prefilled_tokens_turn_2"] < ran["prompt_tokens_turn_2"]


def test_answer_room_must_leave_room_for_a_question(model, processor):
    with pytest.raises(ValueError, match=f"max_new_tokens {model.max_length}: must leave room"):
        ml.ChatSession(model, processor, max_new_tokens=model.max_length)


# ---- the static cache: the chat's decode path for torch.compile ---------------------------------------------------
def static_script(model, processor, **kw):
    """A chat that adds images at turns 1 and 3, rolls back (reset, then a shorter conversation), and samples."""
    imgs = [random_image(40, 30, 0), random_image(24, 50, 1), random_image(32, 32, 2)]
    chat = chat_of(model, processor, **kw)
    out = [(chat.ask(q, images=im), dict(chat.stats)) for q, im in
           [("What color is the circle?", imgs[:1]), ("Where is it?", []), ("Which has more shapes?", imgs[1:])]]
    chat.reset()  # a shorter conversation now: the cache's later positions hold the old one's keys
    out += [(chat.ask("How many shapes?", images=imgs[2:]), dict(chat.stats))]
    chat.temperature, chat.top_p = 0.8, 0.9
    out += [(chat.ask("And now?"), dict(chat.stats))]
    return out


@pytest.mark.parametrize("reuse", [True, False])
def test_static_cache_chat_is_token_identical(model, processor, monkeypatch, reuse):
    """compile=True: one static cache for the whole chat, overwritten after a reset; the same tokens, reuse and
    stats as the growing cache. (The compiled step is swapped for its eager self here; the slow test compiles.)"""
    from minillava import decoding

    monkeypatch.setattr(decoding, "_compiled_step", lambda device_type: decoding._one_step)
    eager = static_script(model, processor, reuse_cache=reuse)
    static = static_script(model, processor, reuse_cache=reuse, compile=True)
    for (a, s), (b, t) in zip(eager, static):
        assert a == b and s["new_token_ids"] == t["new_token_ids"]
        assert {k: v for k, v in s.items() if k != "ttft_s"} == {k: v for k, v in t.items() if k != "ttft_s"}
    assert sum(len(s["new_token_ids"]) for _, s in eager) > 10


def test_static_cache_is_made_once_and_refuses_a_growing_one(model, processor, monkeypatch):
    from minillava import decoding

    monkeypatch.setattr(decoding, "_compiled_step", lambda device_type: decoding._one_step)
    chat = chat_of(model, processor, compile=True, max_new_tokens=3)
    chat.ask("Hello?")
    first = chat._static
    chat.reset()
    chat.ask("Hello again?", images=[random_image()])
    assert chat._static is first and first.get_max_length() == model.max_length
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(torch.tensor([[1, 2]]), cache=decoding.new_cache(model), compile=True)


@pytest.mark.slow
def test_compiled_chat_is_token_identical(model, processor):
    """The real thing: the one-token step compiled by torch.compile, across turns, a reset and sampling."""
    eager = static_script(model, processor)
    compiled = static_script(model, processor, compile=True)
    assert [s["new_token_ids"] for _, s in compiled] == [s["new_token_ids"] for _, s in eager]
