"""Evaluation: visual question answering accuracy per question type, on any LLaVA-format file with answers.

Each assistant turn of a record is one question: the model sees the conversation up to that question with the
reference answers of earlier turns (teacher forcing, as multi-turn VQA is usually scored), generates greedily,
and the answer is compared with the reference after normalisation, in two forms:

- **exact**: the normalised answer equals the normalised reference;
- **contains**: the reference's normalised words appear, in order, in the answer (lenient, for chatty models).

LLaVA-1.5 evaluates short-answer benchmarks with the suffix "Answer the question using a single word or
phrase."; `suffix=SHORT_ANSWER` adds it to every question.
"""

from __future__ import annotations

import re

import torch

from .data.records import Record
from .model import LlavaModel
from .processor import Processor
from .utils import read_json

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str, drop_articles: bool = True) -> str:
    """Lower-case, drop punctuation and articles, spell numbers as digits: "The Red circle." -> "red circle"."""
    text = re.sub(r"[^\w\s\[\]\.,]", " ", text.lower())
    text = re.sub(r"(?<!\d)[.,]|[.,](?!\d)", " ", text)  # a dot between digits stays: "0.25"
    words = [_NUMBERS.get(w, w) for w in text.split() if not (drop_articles and w in _ARTICLES)]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    """The normalised answer equals the normalised reference: "The red circle." matches "red circle". An answer
    that normalises to nothing ("", "A.") matches nothing."""
    pred = normalize(prediction)
    return pred != "" and pred == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    """The reference's words appear as a contiguous phrase in the prediction."""
    pred, ref = f" {normalize(prediction)} ", f" {normalize(reference)} "
    return ref.strip() != "" and ref in pred


# ---- VQAv2's soft accuracy ----------------------------------------------------------------------------------
# VQAv2 has ten human answers per question; an answer scores min(1, (humans who gave it) / 3), averaged over the
# ten ways of leaving one human out. Answers are compared after the VQA evaluation's normalisation: punctuation
# dropped (or turned into a space), a period kept only before a digit, lower case, number words as digits,
# articles dropped, apostrophe-less contractions restored ("dont" -> "don't").
_VQA_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_VQA_DIGITS = {"none": "0", "zero": "0", **{w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split()) if i}}
_CONTRACTIONS = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
                 "haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am "
                 "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've "
                 "she's should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd "
                 "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
                 "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
                 "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
                 "who's who've won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
                 "you'll you're you've").split()
_RESTORE = {c.replace("'", ""): c for c in _CONTRACTIONS}


def vqa_normalize(text: str) -> str:
    """An answer as VQAv2's evaluation compares it: "Two dogs!" -> "2 dogs", "It's a cat." -> "it's cat"."""
    text = original = text.replace("\n", " ").replace("\t", " ").strip()
    glue = re.search(r"\d,\d", text) is not None  # "1,000": punctuation goes without leaving a space
    for p in _VQA_PUNCT:  # (whether a mark touches a space is read from the answer as given, as the official script)
        text = text.replace(p, "" if glue or f"{p} " in original or f" {p}" in original else " ")
    text = re.sub(r"\.(?!\d)", "", text)
    words = [_VQA_DIGITS.get(w, w) for w in text.lower().split()]
    return " ".join(_RESTORE.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's accuracy of one prediction against its human answers (10 in VQAv2): for each human left out,
    min(1, matches among the others / 3); the mean over the humans. 1.0 when 4 or more humans agree, 0.9 for 3.
    Both sides are normalised (`vqa_normalize`); VQAv2's human answers are stored normalised already (digits, no
    articles), and on them this equals the official script, which only strips their punctuation. The measure is
    defined on VQAv2's ten answers: another count raises (one answer would score 0 even when matched)."""
    if len(answers) != 10:
        raise ValueError(f"VQA soft accuracy needs VQAv2's 10 human answers, got {len(answers)}")
    pred, refs = vqa_normalize(prediction), [vqa_normalize(a) for a in answers]
    return sum(min(1.0, sum(r == pred for k, r in enumerate(refs) if k != i) / 3) for i in range(len(refs))) / len(refs)


# ---- MMBench's multiple choice and CircularEval --------------------------------------------------------------
LETTERS = "ABCDEFGH"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt


def mc_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice question as LLaVA-1.5 asks MMBench: the question, one "A. option" line per option,
    then `MC_SUFFIX`."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"multiple choice: 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question] + [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines)


def match_option(answer: str, options: list[str]) -> int | None:
    """The option a free-form answer picks, as MMBench's extraction does before it asks a judge model: a letter
    at the start, alone or marked as one ("B", "B.", "(B) ...", "B) ...", "B: ..."; "A red square." is the article,
    not option A), else the one option whose text the answer contains (`contains`); None when neither decides
    (no option, or more than one)."""
    letters = LETTERS[:len(options)]
    head = re.match(rf"^\s*\(?([{letters}])(?:[.):]|\s*$)", answer)
    if head:
        return letters.index(head.group(1))
    hits = [k for k, o in enumerate(options) if contains(answer, o)]
    return hits[0] if len(hits) == 1 else None


def circular_eval(choose, question: str, options: list[str], answer: int) -> dict:
    """MMBench's CircularEval of one question: ask it len(options) times, the options rotated by one each time
    (so the right one stands at every letter once); it counts as right only if every pass picks it.
    `choose(prompt) -> answer text` asks the model (`mc_prompt` makes the prompt). Returns {"picked": the
    option each pass chose, in the original numbering (None: no choice could be read), "single": the first
    pass was right (plain accuracy), "circular": every pass was right}."""
    if not 0 <= answer < len(options):
        raise ValueError(f"circular eval: answer index {answer} is not one of the {len(options)} options")
    n, picked = len(options), []
    for shift in range(n):
        order = [(k + shift) % n for k in range(n)]  # pass `shift` shows option order[j] at letter j
        choice = match_option(choose(mc_prompt(question, [options[k] for k in order])), [options[k] for k in order])
        picked.append(None if choice is None else order[choice])
    right = [p == answer for p in picked]
    return {"picked": picked, "single": right[0], "circular": all(right)}


def questions(records: list[Record], suffix: str = "") -> list[dict]:
    """Records -> one question per assistant turn: {"id", "turn", "qtype", "messages", "images", "reference"},
    plus "answers" (VQAv2's human answers) when a single-turn record carries them in its "answers" field.
    Turns whose qtype is "context" are history only (a multi-turn test's earlier turns): not asked."""
    out = []
    for r in records:
        qtypes = r.meta.get("qtypes") or []
        answers = r.meta.get("answers")
        if answers is not None and not (isinstance(answers, list) and len(answers) == 10
                                        and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"record {r.id!r}: 'answers' must be a list of 10 strings (VQAv2's human answers, "
                             f"which its soft accuracy is defined on), got {answers!r}")
        if answers and sum(m["role"] == "assistant" for m in r.messages) != 1:
            raise ValueError(f"record {r.id!r}: 'answers' belong to a single question, but the record has "
                             f"{sum(m['role'] == 'assistant' for m in r.messages)} answers")
        turn = 0
        for i, m in enumerate(r.messages):
            if m["role"] != "assistant":
                continue
            if turn < len(qtypes) and qtypes[turn] == "context":  # given as history, not asked
                turn += 1
                continue
            prompt = [dict(x) for x in r.messages[:i]]
            prompt[-1]["content"] += suffix
            shown = sum(x["content"].count("<image>") for x in prompt)  # an image attached later is not here yet
            out.append({"id": r.id, "turn": turn, "qtype": qtypes[turn] if turn < len(qtypes) else "unknown",
                        "messages": prompt, "images": r.images[:shown], "reference": m["content"],
                        **({"answers": answers} if answers else {})})
            turn += 1
    return out


@torch.no_grad()
def answer(model: LlavaModel, processor: Processor, qs: list[dict], batch_size: int = 32,
           max_new_tokens: int = 96, progress: bool = True, compile: bool = False) -> list[str]:
    """Greedy answers to `questions`, batched with left padding; the end-of-turn separator is stripped.
    96 new tokens hold the longest ShapesWorld answer (a detailed description of 4 objects: 73 tokens).
    `compile`: decode with the static cache and the compiled one-token step (`decoding.generate`)."""
    from tqdm.auto import tqdm

    stop = processor.stop_token_ids()
    order = sorted(range(len(qs)), key=lambda i: len(qs[i]["images"]))  # similar prompts batch together
    by_index = {}
    for start in tqdm(range(0, len(order), batch_size), desc="answering", disable=not progress, mininterval=2.0):
        idx = order[start:start + batch_size]
        batch = processor([qs[i]["messages"] for i in idx], [qs[i]["images"] for i in idx],
                          add_generation_prompt=True, sample_ids=[_name(qs[i], i) for i in idx])
        out = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"],
                             max_new_tokens=max_new_tokens, eos_token_id=stop, compile=compile)
        for i, row in zip(idx, out.tolist()):
            text = processor.decode([t for t in row if t not in stop])
            by_index[i] = text.split(processor.template.stop_str)[0].strip()
    return [by_index[i] for i in range(len(qs))]


def _name(q: dict, i: int) -> str:
    """How an error names a question: its record and turn where it has them, else its position."""
    return f"{q['id']}, turn {q.get('turn', 0)}" if "id" in q else f"question {i}"


def score(qs: list[dict], answers: list[str]) -> dict:
    """Accuracy overall and per question type: {"overall": {...}, "by_type": {qtype: {"n", "exact", "contains"}}}."""
    if len(qs) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(qs)} questions")
    if not qs:
        raise ValueError("no questions to score (the records hold only history turns, or none)")
    soft = all("answers" in q for q in qs)  # VQAv2-style questions: the soft accuracy too
    table: dict[str, list] = {}
    for q, a in zip(qs, answers):
        table.setdefault(q["qtype"], []).append((exact_match(a, q["reference"]), contains(a, q["reference"]),
                                                 vqa_soft_accuracy(a, q["answers"]) if soft else None))

    def summarise(rows):
        n = len(rows)
        out = {"n": n, "exact": sum(r[0] for r in rows) / n, "contains": sum(r[1] for r in rows) / n}
        return {**out, "vqa_soft": sum(r[2] for r in rows) / n} if soft else out

    return {"overall": summarise([r for rows in table.values() for r in rows]),
            "by_type": {k: summarise(v) for k, v in sorted(table.items())}}


def evaluate_vqa(model: LlavaModel, processor: Processor, records: list[Record], suffix: str = "",
                 batch_size: int = 32, max_new_tokens: int = 96, progress: bool = True,
                 compile: bool = False) -> dict:
    """Answer every question of `records` and score it; returns the scores plus the per-question rows."""
    qs = questions(records, suffix)
    if not qs:
        raise ValueError("no questions with reference answers in the records")
    answers = answer(model, processor, qs, batch_size, max_new_tokens, progress, compile)
    result = score(qs, answers)
    result["predictions"] = [{"id": q["id"], "turn": q["turn"], "qtype": q["qtype"], "reference": q["reference"],
                              "answer": a} for q, a in zip(qs, answers)]
    return result


def format_table(result: dict) -> str:
    """A plain-text table of a `score` result."""
    soft = "vqa_soft" in result["overall"]
    lines = [f"{'question type':<16}{'n':>6}{'exact':>9}{'contains':>10}" + (f"{'VQA acc':>10}" if soft else "")]
    for k, v in {**result["by_type"], "overall": result["overall"]}.items():
        lines.append(f"{k:<16}{v['n']:>6}{v['exact']:>9.1%}{v['contains']:>10.1%}"
                     + (f"{v['vqa_soft']:>10.1%}" if soft else ""))
    return "\n".join(lines)


def paired_bootstrap(correct, reference=None, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy of per-question scores `correct` (n,) (1 right, 0 wrong) with a percentile bootstrap interval:
    `resamples` draws of n questions with replacement, the middle `level` of their accuracies.
    {"n", "exact", "ci": [lo, hi]}; with `reference`, the same questions scored for another model (n,), also
    {"diff": exact - reference's, "diff_ci"}, the two models scored on *the same* draws, so that how hard the
    drawn questions are, which both share, cancels out of the difference."""
    c = torch.as_tensor(correct, dtype=torch.float64)
    if c.ndim != 1 or not len(c):
        raise ValueError(f"expected one score per question, got shape {tuple(c.shape)}")
    idx = torch.randint(len(c), (resamples, len(c)), generator=torch.Generator().manual_seed(seed))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {"n": len(c), "exact": c.mean().item(), "ci": torch.quantile(c[idx].mean(1), q).tolist()}
    if reference is not None:
        r = torch.as_tensor(reference, dtype=torch.float64)
        if r.shape != c.shape:
            raise ValueError(f"the reference has {len(r)} scores for {len(c)} questions")
        out.update(diff=out["exact"] - r.mean().item(), diff_ci=torch.quantile((c[idx] - r[idx]).mean(1), q).tolist())
    return out


def pope_yes(text: str) -> bool:
    """Whether an answer to a POPE question says yes, as LLaVA's `eval_pope.py` reads it: its first sentence
    (up to the first "."), commas dropped, is "no" if one of its words is "No", "no" or "not", else "yes" (an
    empty answer too)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ({"No", "no", "not"} & set(words))


def pope_metrics(answers: list[str], references: list[str]) -> dict:
    """Accuracy, precision, recall, F1 of "yes" (the positive class) and the ratio of "yes" answers, each answer
    read as LLaVA's POPE evaluation reads it (`pope_yes`)."""
    if len(answers) != len(references) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(references)} POPE questions")
    pred = [pope_yes(a) for a in answers]
    gold = [pope_yes(r) for r in references]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"n": len(pred), "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(pred),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(pred) / len(pred)}


def score_answer_file(qs: list[dict], path) -> dict:
    """Score answers written elsewhere: a JSON list of {"id", "turn", "answer"}, one per question of `qs`."""
    rows = read_json(path, what="answer file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "answer"} <= set(r) for r in rows):
        raise ValueError(f"answer file '{path}': expected a JSON list of {{\"id\", \"turn\", \"answer\"}} objects")
    bad = next((r for r in rows if not isinstance(r["answer"], str)), None)
    if bad is not None:
        raise ValueError(f"answer file '{path}': the answer of {bad['id']!r} is {bad['answer']!r}, not text")
    given = {(str(r["id"]), int(r.get("turn", 0))): r["answer"] for r in rows}
    if len(given) < len(rows):
        seen = [(str(r["id"]), int(r.get("turn", 0))) for r in rows]
        twice = next(k for k in seen if seen.count(k) > 1)
        raise ValueError(f"answer file '{path}': two answers for question {twice} (id, turn)")
    wanted = [(q["id"], q["turn"]) for q in qs]
    missing = [k for k in wanted if k not in given]
    extra = [k for k in given if k not in set(wanted)]
    if missing or extra:
        raise ValueError(f"answer file '{path}' does not match the questions: {len(missing)} questions have no "
                         f"answer (e.g. {missing[:3]}), {len(extra)} answers match no question (e.g. {extra[:3]})")
    return score(qs, [given[k] for k in wanted])


# ---- what a chat model knows without images, and keeps after training (forgetting) -----------------------------
def rule_holds(answer_text: str, q: dict) -> bool:
    """Whether an answer satisfies a written rule `q` = {"accept": [phrases], "reject": [phrases], "case": bool,
    "ignore": [regular expressions]}: its first sentence (what the model answers first, not what it rambles on to),
    without what `ignore` matches (the question restated: "9 divided by 3" holds a 3 that is no answer), contains an
    accepted phrase as whole words and no rejected one; normalised (`normalize`, articles kept: the letters "a b c"
    are an answer) unless `case`, then the raw text is searched."""
    answer_text = re.split(r"(?<=[.!?])\s+|\n", answer_text.strip(), maxsplit=1)[0]
    for pattern in q.get("ignore", []):
        answer_text = re.sub(pattern, " ", answer_text, flags=re.IGNORECASE)

    def has(phrase):
        if q.get("case"):
            return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", answer_text) is not None
        return f" {normalize(phrase, False)} " in f" {normalize(answer_text, False)} "

    return any(has(p) for p in q["accept"]) and not any(has(p) for p in q.get("reject", []))


def evaluate_rules(model: LlavaModel, processor: Processor, qs: list[dict], batch_size: int = 16,
                   max_new_tokens: int = 48, progress: bool = True) -> dict:
    """Ask text-only questions `qs` ({"id", "kind", "question", "accept", ...}, no image) in the processor's
    template with its default system prompt, greedily; check each answer with its rule (`rule_holds`).
    Returns {"n", "correct", "by_kind": {kind: share correct}, "answers": [{"id", "answer", "correct"}]}."""
    asked = [{"id": q["id"], "messages": [{"role": "user", "content": q["question"]}], "images": []} for q in qs]
    return rules_report(qs, answer(model, processor, asked, batch_size, max_new_tokens, progress))


def rules_report(qs: list[dict], answers: list[str]) -> dict:
    """`answers` (one text per question of `qs`) checked with their rules (`rule_holds`), as `evaluate_rules`
    returns them: {"n", "correct", "by_kind", "answers"}. Stored answers can be checked again after a rule is fixed."""
    if not qs:
        raise ValueError("no questions to check (an empty forgetting set: the base model answered none right?)")
    right = [rule_holds(a, q) for a, q in zip(answers, qs, strict=True)]
    kinds = sorted({q["kind"] for q in qs})
    return {"n": len(qs), "correct": sum(right) / max(len(qs), 1),
            "by_kind": {k: sum(r for r, q in zip(right, qs) if q["kind"] == k) / sum(q["kind"] == k for q in qs)
                        for k in kinds},
            "answers": [{"id": q["id"], "answer": a, "correct": r} for q, a, r in zip(qs, answers, right)]}
