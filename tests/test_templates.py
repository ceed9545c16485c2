"""Tests for minillava.templates: LLaVA's prompt strings, the Jinja twin, and label masks from offsets.

Expected prompts are written out literally from LLaVA's conversation.py / train.py, never computed by the
code under test. The tokenizers are tiny ones trained here (no network): a byte-level BPE (GPT-2 style,
"ĠA") and a SentencePiece-style BPE with a Metaspace pre-tokenizer (Llama style, "▁A").
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from minillava.templates import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    Template,
    from_llava,
    get_template,
    to_llava,
)

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
           "that the user provides, and assist the user with a variety of tasks using natural language.")
MPT = ("A conversation between a user and an LLM-based AI assistant. "
       "The assistant gives helpful and honest answers.")

TURNS = [("<image>\nWhat is in the image?", "A cat."), ("What color is it?", "Black."),
         ("Is it asleep?", "Yes, on a sofa.")]


def conversation(n: int, generation: bool) -> list[dict]:
    """`n` rounds; with `generation` the last one has its question only."""
    messages = []
    for question, answer in TURNS[:n]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages[:-1] if generation else messages


# (template, rounds, generation prompt) -> the reference's get_prompt() string.
EXPECTED = {
    ("vicuna_v1", 1, False): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
    ("vicuna_v1", 1, True): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT:",
    ("vicuna_v1", 2, False): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                      "USER: What color is it? ASSISTANT: Black.</s>",
    ("vicuna_v1", 2, True): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                     "USER: What color is it? ASSISTANT:",
    ("vicuna_v1", 3, False): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                      "USER: What color is it? ASSISTANT: Black.</s>"
                                      "USER: Is it asleep? ASSISTANT: Yes, on a sofa.</s>",
    ("vicuna_v1", 3, True): VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                     "USER: What color is it? ASSISTANT: Black.</s>"
                                     "USER: Is it asleep? ASSISTANT:",
    ("llava_v1", 1, False): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
    ("llava_v1", 1, True): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT:",
    ("llava_v1", 2, False): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                       "USER: What color is it? ASSISTANT: Black.</s>",
    ("llava_v1", 2, True): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                      "USER: What color is it? ASSISTANT:",
    ("llava_v1", 3, False): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                       "USER: What color is it? ASSISTANT: Black.</s>"
                                       "USER: Is it asleep? ASSISTANT: Yes, on a sofa.</s>",
    ("llava_v1", 3, True): LLAVA_V1 + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                                      "USER: What color is it? ASSISTANT: Black.</s>"
                                      "USER: Is it asleep? ASSISTANT:",
    ("llava_llama_2", 1, False): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                 "<image>\nWhat is in the image? [/INST] A cat. </s>",
    ("llava_llama_2", 1, True): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                "<image>\nWhat is in the image? [/INST]",
    ("llava_llama_2", 2, False): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                 "<image>\nWhat is in the image? [/INST] A cat. </s>"
                                 "<s>[INST] What color is it? [/INST] Black. </s>",
    ("llava_llama_2", 2, True): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                "<image>\nWhat is in the image? [/INST] A cat. </s>"
                                "<s>[INST] What color is it? [/INST]",
    ("llava_llama_2", 3, False): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                 "<image>\nWhat is in the image? [/INST] A cat. </s>"
                                 "<s>[INST] What color is it? [/INST] Black. </s>"
                                 "<s>[INST] Is it asleep? [/INST] Yes, on a sofa. </s>",
    ("llava_llama_2", 3, True): "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n"
                                "<image>\nWhat is in the image? [/INST] A cat. </s>"
                                "<s>[INST] What color is it? [/INST] Black. </s>"
                                "<s>[INST] Is it asleep? [/INST]",
    ("mistral_instruct", 1, False): "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>",
    ("mistral_instruct", 1, True): "[INST] <image>\nWhat is in the image? [/INST]",
    ("mistral_instruct", 2, False): "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>"
                                    "[INST] What color is it? [/INST] Black. </s>",
    ("mistral_instruct", 2, True): "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>"
                                   "[INST] What color is it? [/INST]",
    ("mistral_instruct", 3, False): "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>"
                                    "[INST] What color is it? [/INST] Black. </s>"
                                    "[INST] Is it asleep? [/INST] Yes, on a sofa. </s>",
    ("mistral_instruct", 3, True): "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>"
                                   "[INST] What color is it? [/INST] Black. </s>[INST] Is it asleep? [/INST]",
    ("chatml_direct", 1, False): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                 "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                 "<|im_start|>assistant\nA cat.<|im_end|>",
    ("chatml_direct", 1, True): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                "<|im_start|>assistant\n",
    ("chatml_direct", 2, False): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                 "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                 "<|im_start|>assistant\nA cat.<|im_end|>"
                                 "<|im_start|>user\nWhat color is it?<|im_end|>"
                                 "<|im_start|>assistant\nBlack.<|im_end|>",
    ("chatml_direct", 2, True): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                "<|im_start|>assistant\nA cat.<|im_end|>"
                                "<|im_start|>user\nWhat color is it?<|im_end|>"
                                "<|im_start|>assistant\n",
    ("chatml_direct", 3, False): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                 "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                 "<|im_start|>assistant\nA cat.<|im_end|>"
                                 "<|im_start|>user\nWhat color is it?<|im_end|>"
                                 "<|im_start|>assistant\nBlack.<|im_end|>"
                                 "<|im_start|>user\nIs it asleep?<|im_end|>"
                                 "<|im_start|>assistant\nYes, on a sofa.<|im_end|>",
    ("chatml_direct", 3, True): "<|im_start|>system\nAnswer the questions.<|im_end|>"
                                "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                                "<|im_start|>assistant\nA cat.<|im_end|>"
                                "<|im_start|>user\nWhat color is it?<|im_end|>"
                                "<|im_start|>assistant\nBlack.<|im_end|>"
                                "<|im_start|>user\nIs it asleep?<|im_end|>"
                                "<|im_start|>assistant\n",
    ("mpt", 1, False): "<|im_start|>system\n" + MPT + "<|im_end|>"
                       "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                       "<|im_start|>assistant\nA cat.<|im_end|>",
    ("mpt", 1, True): "<|im_start|>system\n" + MPT + "<|im_end|>"
                      "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                      "<|im_start|>assistant\n",
    ("mpt", 2, False): "<|im_start|>system\n" + MPT + "<|im_end|>"
                       "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                       "<|im_start|>assistant\nA cat.<|im_end|>"
                       "<|im_start|>user\nWhat color is it?<|im_end|>"
                       "<|im_start|>assistant\nBlack.<|im_end|>",
    ("mpt", 2, True): "<|im_start|>system\n" + MPT + "<|im_end|>"
                      "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                      "<|im_start|>assistant\nA cat.<|im_end|>"
                      "<|im_start|>user\nWhat color is it?<|im_end|>"
                      "<|im_start|>assistant\n",
    ("mpt", 3, False): "<|im_start|>system\n" + MPT + "<|im_end|>"
                       "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                       "<|im_start|>assistant\nA cat.<|im_end|>"
                       "<|im_start|>user\nWhat color is it?<|im_end|>"
                       "<|im_start|>assistant\nBlack.<|im_end|>"
                       "<|im_start|>user\nIs it asleep?<|im_end|>"
                       "<|im_start|>assistant\nYes, on a sofa.<|im_end|>",
    ("mpt", 3, True): "<|im_start|>system\n" + MPT + "<|im_end|>"
                      "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
                      "<|im_start|>assistant\nA cat.<|im_end|>"
                      "<|im_start|>user\nWhat color is it?<|im_end|>"
                      "<|im_start|>assistant\nBlack.<|im_end|>"
                      "<|im_start|>user\nIs it asleep?<|im_end|>"
                      "<|im_start|>assistant\n",
    ("plain", 1, False): "<image>A cat.\n",
    ("plain", 1, True): "<image>",
}

# The supervised text of each round: the answer, its end separator, and the space before it (if any).
ANSWERS = {
    "vicuna_v1": [" A cat.</s>", " Black.</s>", " Yes, on a sofa.</s>"],
    "llava_v1": [" A cat.</s>", " Black.</s>", " Yes, on a sofa.</s>"],
    "llava_llama_2": [" A cat. </s>", " Black. </s>", " Yes, on a sofa. </s>"],
    "mistral_instruct": [" A cat. </s>", " Black. </s>", " Yes, on a sofa. </s>"],
    "chatml_direct": ["A cat.<|im_end|>", "Black.<|im_end|>", "Yes, on a sofa.<|im_end|>"],
    "mpt": ["A cat.<|im_end|>", "Black.<|im_end|>", "Yes, on a sofa.<|im_end|>"],
    "plain": ["A cat.\n"],
}

CASES = [(name, n, generation) for (name, n, generation) in EXPECTED]

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_PLACEHOLDER, "<|im_start|>", "<|im_end|>"]


def _train(kind: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """A tiny fast tokenizer trained on the expected prompts; kind "bytelevel" or "metaspace"."""
    corpus = list(EXPECTED.values()) * 3
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = sorted(set("".join(corpus)))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="session")
def small_tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {kind: _train(kind, SPECIALS) for kind in ("bytelevel", "metaspace")}


def _word_level(words: list[str], pre_tokenizer) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is exactly `words`, for provoking alignment errors."""
    vocab = {word: i for i, word in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _runs(out: dict) -> list[tuple[bool, list[int]]]:
    """Consecutive runs (supervised, ids) of a tokenize() result."""
    runs: list[tuple[bool, list[int]]] = []
    for token_id, label in zip(out["input_ids"], out["labels"]):
        supervised = label != IGNORE_INDEX
        if supervised:
            assert label == token_id
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token_id)
        else:
            runs.append((supervised, [token_id]))
    return runs


# --- rendering -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n, generation", CASES)
def test_render_matches_reference(name, n, generation):
    template = get_template(name)
    messages = conversation(n, generation)
    assert template.render(messages, add_generation_prompt=generation) == EXPECTED[name, n, generation]
    segments = template.segments(messages, add_generation_prompt=generation)
    assert "".join(text for text, _ in segments) == EXPECTED[name, n, generation]
    assert [text for text, supervised in segments if supervised] == ANSWERS[name][:n - generation]


@pytest.mark.parametrize("name, n, generation", CASES)
def test_jinja_matches_render(small_tokenizers, name, n, generation):
    template = get_template(name)
    messages = conversation(n, generation)
    jinja = small_tokenizers["bytelevel"].apply_chat_template(
        messages, chat_template=template.to_jinja(), tokenize=False, add_generation_prompt=generation)
    assert jinja == template.render(messages, add_generation_prompt=generation)


@pytest.mark.parametrize("name", [name for name in TEMPLATES if name != "plain"])
@pytest.mark.parametrize("first", ["What is in the image?\n<image>", "<image> What is in the image?",
                                   "<image>", "Compare <image> with", "Is <image> a cat?",
                                   "<image> or <image>?", "No image here."])
def test_jinja_matches_render_for_images_and_system(small_tokenizers, name, first):
    template = get_template(name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": first},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And <image>?"}]
    if first.count("<image>") == 1:
        messages[-1]["content"] = "And now?"
    jinja = small_tokenizers["bytelevel"].apply_chat_template(
        messages, chat_template=template.to_jinja(), tokenize=False, add_generation_prompt=True)
    assert jinja == template.render(messages, add_generation_prompt=True)


@pytest.mark.parametrize("first, rendered", [
    ("What is in the image?\n<image>", "<image>\nWhat is in the image?"),  # LLaVA data, image last
    ("<image> What is in the image?", "<image>\nWhat is in the image?"),
    ("  <image>\n\nWhat?  ", "<image>\nWhat?"),
    ("<image>", "<image>"),                                                # reference strips "<image>\n"
    ("Is <image> a cat?", "Is <image> a cat?"),                            # mid-text: left in place
    ("<image> or <image>?", "<image> or <image>?"),                        # several images: left in place
])
def test_single_image_moves_to_the_front(first, rendered):
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "A cat."}]
    expected = VICUNA + " USER: " + rendered + " ASSISTANT: A cat.</s>"
    assert get_template("vicuna_v1").render(messages) == expected


def test_image_is_not_moved_when_a_later_turn_has_one():
    messages = [{"role": "user", "content": "What is this?\n<image>"},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "<image> And this?"}]
    assert get_template("mistral_instruct").render(messages) == (
        "[INST] What is this?\n<image> [/INST] A cat. </s>[INST] <image> And this? [/INST]")


def test_system_message_overrides_default():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert get_template("vicuna_v1").render(messages, True) == "Be brief. USER: Hi ASSISTANT:"
    assert get_template("llava_llama_2").render(messages, True) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    assert get_template("mistral_instruct").render(messages[1:], True) == "[INST] Hi [/INST]"
    assert get_template("chatml_direct").render(messages, True) == (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n")


def test_plain_keeps_only_the_image_and_caption():
    messages = [{"role": "user", "content": "Describe the image briefly.\n<image>"},
                {"role": "assistant", "content": "A black cat on a sofa."}]
    assert get_template("plain").render(messages) == "<image>A black cat on a sofa.\n"
    assert get_template("plain").segments(messages) == [
        ("<image>", False), ("A black cat on a sofa.\n", True)]


@pytest.mark.parametrize("messages, match", [
    (conversation(2, False), "message 2: template 'plain' is single-turn"),
    ([{"role": "user", "content": "No image."}, {"role": "assistant", "content": "x"}], "needs '<image>'"),
    ([{"role": "system", "content": "s"}] + conversation(1, False),
     "message 0: template 'plain' takes no system"),
])
def test_plain_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        get_template("plain").render(messages)


@pytest.mark.parametrize("messages, generation, match", [
    ([{"role": "assistant", "content": "Hi"}], False, "message 0: expected role 'user', got 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False,
     "message 1: expected role 'assistant', got 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
      {"role": "system", "content": "t"}], False, "message 2: expected role 'assistant', got 'system'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], False, "message 1: .*'bot'"),
    ([{"role": "user"}], False, "message 0: expected"),
    ([], False, "at least one user message"),
    (conversation(1, False), True, "message 1: add_generation_prompt needs"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], False,
     "message 1: an assistant message cannot hold"),
])
def test_bad_conversations_raise(messages, generation, match):
    with pytest.raises(ValueError, match=match):
        get_template("vicuna_v1").render(messages, add_generation_prompt=generation)


def test_stop_strings():
    assert {name: t.stop_str for name, t in TEMPLATES.items()} == {
        "plain": "\n", "vicuna_v1": "</s>", "llava_v1": "</s>", "llava_hf": "</s>", "llava_llama_2": "</s>",
        "mistral_instruct": "</s>", "chatml_direct": "<|im_end|>", "mpt": "<|im_end|>", "smollm2": "<|im_end|>"}


def test_get_template():
    assert list(TEMPLATES) == ["plain", "vicuna_v1", "llava_v1", "llava_hf", "llava_llama_2", "mistral_instruct",
                               "chatml_direct", "mpt", "smollm2"]
    assert get_template("mpt") is TEMPLATES["mpt"]
    custom = Template("custom", user=("Q: ", "\n"), assistant_tag="A:", answer=(" ", "\n"))
    assert get_template(custom) is custom
    assert custom.render(conversation(1, True), True) == "Q: <image>\nWhat is in the image?\nA:"
    with pytest.raises(ValueError, match=r"unknown template 'foo'; known: plain, vicuna_v1, llava_v1, "):
        get_template("foo")


# --- LLaVA records -----------------------------------------------------------------------------------------

def test_from_llava_and_back():
    record = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat?"},
              {"from": "gpt", "value": "A cat."}]
    messages = from_llava(record)
    assert messages == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "<image>\nWhat?"},
                        {"role": "assistant", "content": "A cat."}]
    assert to_llava(messages) == record


@pytest.mark.parametrize("record, match", [
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "turn 1: unknown 'from' value 'bot'"),
    ([{"from": "human", "value": "a"}, {"value": "b"}], "turn 1: missing key 'from'"),
    ([{"from": "human"}], "turn 0: missing key 'value'"),
    ([{"from": "human", "value": None}], "turn 0: 'value' must be a string"),
    (["human: hi"], "turn 0: expected a dict"),
])
def test_from_llava_rejects_bad_records(record, match):
    with pytest.raises(ValueError, match=match):
        from_llava(record)


def test_to_llava_rejects_bad_roles():
    with pytest.raises(ValueError, match="message 0: unknown 'role' value 'tool'"):
        to_llava([{"role": "tool", "content": "x"}])


# --- tokenization and labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("name, n, generation", CASES)
def test_labels_supervise_exactly_the_answers(small_tokenizers, kind, name, n, generation):
    tok = small_tokenizers[kind]
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    out = get_template(name).tokenize(conversation(n, generation), tok, add_generation_prompt=generation,
                                      num_image_tokens=5)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(image_id) == 5
    assert all(label == IGNORE_INDEX for token_id, label in zip(ids, labels) if token_id == image_id)

    runs = _runs(out)
    answers = ANSWERS[name][:n - generation]
    supervised = [tok.decode(run, clean_up_tokenization_spaces=False) for flag, run in runs if flag]
    if kind == "bytelevel":  # lossless decoding
        assert supervised == answers
    else:  # a leading "▁" decodes to nothing, and this BPE learned "\nA", so whitespace may differ up front
        assert [text.lstrip() for text in supervised] == [answer.lstrip() for answer in answers]

    rest = EXPECTED[name, n, generation]
    for answer in answers:
        rest = rest.replace(answer, "", 1)
    # Unsupervised runs, each image's 5 ids collapsed back to one "<image>".
    unsupervised = [[t for i, t in enumerate(run) if t != image_id or run[i - 1] != image_id]
                    for flag, run in runs if not flag]
    decoded = "".join(tok.decode(run, clean_up_tokenization_spaces=False) for run in unsupervised)
    if kind == "bytelevel":
        assert decoded == "<s>" + rest
    else:  # Metaspace prepends "▁" to the text's first word, as Llama's tokenizer does
        assert "".join(decoded.split()) == "".join(("<s>" + rest).split())


@pytest.mark.parametrize("kind, first_answer_token", [("bytelevel", "ĠA"), ("metaspace", "▁A")])
@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2"])
def test_generation_prompt_is_a_prefix_and_the_space_is_supervised(small_tokenizers, kind, first_answer_token,
                                                                   name):
    """Training sees the prompt used at inference; its first target is the answer token with the space."""
    tok, template = small_tokenizers[kind], get_template(name)
    prompt = template.tokenize(conversation(1, True), tok, add_generation_prompt=True)
    full = template.tokenize(conversation(1, False), tok)
    k = len(prompt["input_ids"])
    assert full["input_ids"][:k] == prompt["input_ids"]
    assert set(full["labels"][:k]) == set(prompt["labels"]) == {IGNORE_INDEX}
    assert tok.convert_ids_to_tokens(full["labels"][k]) == first_answer_token


def test_multiple_images_expand_in_place(small_tokenizers):
    tok = small_tokenizers["bytelevel"]
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    messages = [{"role": "user", "content": "Is <image> the same cat as <image>?"},
                {"role": "assistant", "content": "Yes."}]
    template = get_template("vicuna_v1")
    assert template.render(messages) == (
        VICUNA + " USER: Is <image> the same cat as <image>? ASSISTANT: Yes.</s>")
    one = template.tokenize(messages, tok)
    many = template.tokenize(messages, tok, num_image_tokens=576)
    assert many["input_ids"].count(image_id) == 2 * 576
    assert len(many["input_ids"]) == len(one["input_ids"]) + 2 * 575
    assert [x for x in many["labels"] if x != IGNORE_INDEX] == [x for x in one["labels"] if x != IGNORE_INDEX]


def test_add_bos_override_and_text_only(small_tokenizers):
    tok = small_tokenizers["metaspace"]
    messages = [{"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": "Black."}]
    with_bos = get_template("vicuna_v1").tokenize(messages, tok)
    without = get_template("vicuna_v1").tokenize(messages, tok, add_bos=False)
    assert with_bos["input_ids"] == [tok.bos_token_id] + without["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + without["labels"]


def test_prompt_without_answers_is_all_ignored(small_tokenizers):
    out = get_template("chatml_direct").tokenize(conversation(1, True), small_tokenizers["bytelevel"],
                                                 add_generation_prompt=True)
    assert set(out["labels"]) == {IGNORE_INDEX}


def test_missing_image_token_raises():
    tok = _train("bytelevel", [s for s in SPECIALS if s != IMAGE_PLACEHOLDER])
    with pytest.raises(ValueError, match=r"sample 'x1': .*'<image>'.*add it as a special token"):
        get_template("vicuna_v1").tokenize(conversation(1, False), tok, sample_id="x1")


def test_too_long_raises_and_names_image_tokens(small_tokenizers):
    template, tok = get_template("vicuna_v1"), small_tokenizers["bytelevel"]
    length = len(template.tokenize(conversation(1, False), tok, num_image_tokens=576)["input_ids"])
    template.tokenize(conversation(1, False), tok, num_image_tokens=576, max_length=length)
    with pytest.raises(ValueError, match=rf"sample 'cat-7': {length} tokens exceed max_length {length - 1} "
                                         r"\(576 of them image tokens"):
        template.tokenize(conversation(1, False), tok, num_image_tokens=576, max_length=length - 1,
                          sample_id="cat-7")


def test_bad_conversation_error_names_the_sample(small_tokenizers):
    messages = [{"role": "assistant", "content": "Hi"}]
    with pytest.raises(ValueError, match="sample 'r2': message 0: expected role 'user'"):
        get_template("vicuna_v1").tokenize(messages, small_tokenizers["bytelevel"], sample_id="r2")


def test_token_straddling_the_answer_boundary_raises():
    # Splitting on " " only keeps "assistant\nA" as one word: one token holding tag and answer.
    tok = _word_level(["system\nAnswer", "the", "questions.", "user\nHi", "assistant\nA", "cat.", " "],
                      pre_tokenizers.Split(" ", behavior="isolated"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A cat."}]
    with pytest.raises(ValueError, match=r"sample 's': token 'assistant\\nA' .* straddles"):
        get_template("chatml_direct").tokenize(messages, tok, sample_id="s")


def test_supervised_text_without_token_raises():
    # WhitespaceSplit drops whitespace, so an empty caption's "\n" gets no token at all.
    tok = _word_level([], pre_tokenizers.WhitespaceSplit())
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": ""}]
    with pytest.raises(ValueError, match=r"supervised text '\\n' got no token"):
        get_template("plain").tokenize(messages, tok)


def test_supervised_tokens_that_do_not_decode_back_raise(small_tokenizers):
    messages = [{"role": "user", "content": "<image>\nWhat is in the image?"},
                {"role": "assistant", "content": "Ωmega"}]
    with pytest.raises(ValueError, match="supervised tokens decode to"):  # "Ω" is <unk> in this vocabulary
        get_template("vicuna_v1").tokenize(messages, small_tokenizers["metaspace"])


def test_tokenizer_without_offsets_raises():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="cannot return character offsets"):
        get_template("vicuna_v1").tokenize(conversation(1, False), SlowTokenizer())


def test_llava_hf_layout_is_transformers_chat_template(small_tokenizers):
    """transformers' llava-1.5-hf chat template, written out: no system prompt, no "</s>" between turns; the
    answers are supervised without their closing space (it opens the next round), and generation stops at EOS."""
    messages = [{"role": "user", "content": "<image>\nWhat is in the image?"},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "What color is it?"}]
    template = get_template("llava_hf")
    assert template.render(messages, add_generation_prompt=True) == (
        "USER: <image>\nWhat is in the image? ASSISTANT: A cat. USER: What color is it? ASSISTANT:")
    assert [t for t, supervised in template.segments(messages[:2]) if supervised] == [" A cat."]
    tok = small_tokenizers["bytelevel"]
    out = template.tokenize(messages[:2], tok, num_image_tokens=3)
    kept = [i for i, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(kept) == " A cat."


@pytest.mark.parametrize("name, n, generation", [c for c in CASES if not c[2]])
def test_jinja_marks_the_supervised_tokens(small_tokenizers, name, n, generation):
    """`{% generation %}` markers: transformers' assistant mask is exactly `tokenize`'s labels (what TRL's
    assistant_only_loss supervises when it renders with the exported template)."""
    template, tok = get_template(name), small_tokenizers["bytelevel"]
    messages = conversation(n, generation)
    assert "{%- generation" not in template.to_jinja()  # (off by default: other runtimes may not know the tag)
    marked = template.to_jinja(assistant_masks=True)
    assert tok.apply_chat_template(messages, chat_template=marked, tokenize=False) == template.render(messages)
    theirs = tok.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ours = template.tokenize(messages, tok, add_bos=False)
    assert theirs["input_ids"] == ours["input_ids"]
    assert theirs["assistant_masks"] == [int(label != IGNORE_INDEX) for label in ours["labels"]]
    assert any(theirs["assistant_masks"])
