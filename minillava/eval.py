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

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, spell numbers as digits: "The Red circle." -> "red circle"."""
    text = re.sub(r"[^\w\s\[\]\.,]", " ", text.lower())
    text = re.sub(r"(?<!\d)[.,]|[.,](?!\d)", " ", text)  # a dot between digits stays: "0.25"
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    """The reference's words appear as a contiguous phrase in the prediction."""
    pred, ref = f" {normalize(prediction)} ", f" {normalize(reference)} "
    return ref.strip() != "" and ref in pred


def questions(records: list[Record], suffix: str = "") -> list[dict]:
    """Records -> one question per assistant turn: {"id", "turn", "qtype", "messages", "images", "reference"}."""
    out = []
    for r in records:
        qtypes = r.meta.get("qtypes") or []
        turn = 0
        for i, m in enumerate(r.messages):
            if m["role"] != "assistant":
                continue
            prompt = [dict(x) for x in r.messages[:i]]
            prompt[-1]["content"] += suffix
            out.append({"id": r.id, "turn": turn, "qtype": qtypes[turn] if turn < len(qtypes) else "unknown",
                        "messages": prompt, "images": r.images, "reference": m["content"]})
            turn += 1
    return out


@torch.no_grad()
def answer(model: LlavaModel, processor: Processor, qs: list[dict], batch_size: int = 32,
           max_new_tokens: int = 96, progress: bool = True) -> list[str]:
    """Greedy answers to `questions`, batched with left padding; the end-of-turn separator is stripped.
    96 new tokens hold the longest ShapesWorld answer (a detailed description of 4 objects: 73 tokens)."""
    from tqdm.auto import tqdm

    stop = processor.stop_token_ids()
    order = sorted(range(len(qs)), key=lambda i: len(qs[i]["images"]))  # similar prompts batch together
    by_index = {}
    for start in tqdm(range(0, len(order), batch_size), desc="answering", disable=not progress, mininterval=2.0):
        idx = order[start:start + batch_size]
        batch = processor([qs[i]["messages"] for i in idx], [qs[i]["images"] for i in idx],
                          add_generation_prompt=True, sample_ids=[_name(qs[i], i) for i in idx])
        out = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"],
                             max_new_tokens=max_new_tokens, eos_token_id=stop)
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
    table: dict[str, list] = {}
    for q, a in zip(qs, answers):
        table.setdefault(q["qtype"], []).append((exact_match(a, q["reference"]), contains(a, q["reference"])))

    def summarise(rows):
        n = len(rows)
        return {"n": n, "exact": sum(e for e, _ in rows) / n, "contains": sum(c for _, c in rows) / n}

    return {"overall": summarise([r for rows in table.values() for r in rows]),
            "by_type": {k: summarise(v) for k, v in sorted(table.items())}}


def evaluate_vqa(model: LlavaModel, processor: Processor, records: list[Record], suffix: str = "",
                 batch_size: int = 32, max_new_tokens: int = 96, progress: bool = True) -> dict:
    """Answer every question of `records` and score it; returns the scores plus the per-question rows."""
    qs = questions(records, suffix)
    if not qs:
        raise ValueError("no questions with reference answers in the records")
    answers = answer(model, processor, qs, batch_size, max_new_tokens, progress)
    result = score(qs, answers)
    result["predictions"] = [{"id": q["id"], "turn": q["turn"], "qtype": q["qtype"], "reference": q["reference"],
                              "answer": a} for q, a in zip(qs, answers)]
    return result


def format_table(result: dict) -> str:
    """A plain-text table of a `score` result."""
    lines = [f"{'question type':<16}{'n':>6}{'exact':>9}{'contains':>10}"]
    for k, v in {**result["by_type"], "overall": result["overall"]}.items():
        lines.append(f"{k:<16}{v['n']:>6}{v['exact']:>9.1%}{v['contains']:>10.1%}")
    return "\n".join(lines)


# ---- hallucination: POPE-style yes/no probes --------------------------------------------------------------
POPE_STRATEGIES = ("random", "popular", "adversarial")


def pope_records(records: list[Record], strategy: str = "random", k: int = 3, seed: int = 0,
                 freq=None) -> list[Record]:
    """POPE (Li et al., 2023) on ShapesWorld: per image, up to k objects that are there ("Yes") and as many
    that are not ("No"), chosen at random, among the most frequent in training ("popular"; pass `freq`), or
    sharing a shape with a present object ("adversarial"). One single-turn record per question."""
    import numpy as np

    from .data import shapesworld as sw

    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"POPE strategy '{strategy}': expected one of {', '.join(POPE_STRATEGIES)}")
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        scene = r.meta.get("scene")
        if not isinstance(scene, dict) or len(r.images) != 1:
            continue  # POPE asks about one image
        scene = sw.Scene.from_dict(scene)
        present = sw.objects_present(scene)
        present = [present[i] for i in rng.permutation(len(present))[:k]]
        absent = sw.absent_objects(scene, rng, k=len(present), strategy=strategy, freq=freq,
                                   exclude=sw.HELD_OUT)
        for (color, shape), label in [(p, "Yes.") for p in present] + [(a, "No.") for a in absent]:
            q = f"<image>\nIs there a {color} {shape} in the image?"
            out.append(Record(f"{r.id}-pope-{color}-{shape}", list(r.images),
                              [{"role": "user", "content": q}, {"role": "assistant", "content": label}],
                              {"qtypes": [f"pope_{strategy}"], "scene": r.meta["scene"]}))
    return out


def pope_metrics(answers: list[str], references: list[str]) -> dict:
    """Accuracy, precision, recall, F1 of "yes" (the positive class) and the ratio of "yes" answers.
    An answer counts as yes when its first word is "yes"."""
    if len(answers) != len(references) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(references)} POPE questions")

    def yes(text):
        return normalize(text).split()[:1] == ["yes"]

    pred = [yes(a) for a in answers]
    gold = [yes(r) for r in references]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"n": len(pred), "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(pred),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(pred) / len(pred)}


# ---- captions: which objects does a caption mention, and are they there? -------------------------------------
def caption_mentions(caption: str) -> list[dict]:
    """Objects a ShapesWorld-style caption or description mentions: [{"size", "color", "shape", "position"}]
    (None if unsaid). Counts and plurals ("1 circle", "2 circles", "no red squares") name no single object
    and are left out."""
    from .data import shapesworld as sw

    sizes, colors, shapes = "|".join(sw.SIZES), "|".join(sw.COLORS), "|".join(sw.SHAPES)
    positions = "|".join(sorted(sw.POSITIONS, key=len, reverse=True))
    pattern = (rf"\b(?:(\d+|no|one|two|three|four|five) )?(?:({sizes}) )?(?:({colors}) )?({shapes})(s?)\b"
               rf"(?: (?:is )?(?:at|in|on) the ({positions})\b)?")  # "... circle (is) at the top left"
    return [{"size": m[1] or None, "color": m[2] or None, "shape": m[3], "position": m[5] or None}
            for m in re.findall(pattern, caption.lower()) if not (m[0] or m[4])]  # counts and plurals: no object


def caption_metrics(captions: list[str], scenes: list) -> dict:
    """Object precision (mentioned objects that are in the scene, matched by colour and shape), object recall
    (scene objects mentioned), and the accuracy of the size and position said for the objects that match.
    Matching is one to one: an object said twice (or two red circles said where there is one) counts once."""
    mentioned = correct = recalled = total = 0
    attr = {"size": [0, 0], "position": [0, 0]}
    for caption, scene in zip(captions, scenes, strict=True):
        free = list(scene.objects)  # not matched yet
        for m in sorted(caption_mentions(caption), key=lambda m: m["position"] is None):  # placed ones first
            mentioned += 1
            same = [o for o in free if o.shape == m["shape"] and m["color"] in (None, o.color)]
            match = next((o for o in same if m["position"] in (None, o.position)), same[0] if same else None)
            if match is None:
                continue
            correct += 1
            free.remove(match)
            for a in attr:
                if m[a] is not None:
                    attr[a][0] += m[a] == getattr(match, a)
                    attr[a][1] += 1
        recalled += len(scene.objects) - len(free)
        total += len(scene.objects)
    return {"n": len(captions), "object_precision": correct / mentioned if mentioned else 0.0,
            "object_recall": recalled / total if total else 0.0,
            **{f"{a}_accuracy": c / n if n else 0.0 for a, (c, n) in attr.items()},
            "mentions_per_caption": mentioned / max(len(captions), 1)}


# ---- one entry point for the command line and for Python ---------------------------------------------------
KINDS = ("vqa", "pope", "caption", "multi-image")


def run_eval(model: LlavaModel, processor: Processor, records: list[Record], kind: str = "vqa",
             suffix: str = "", batch_size: int = 32, progress: bool = True, seed: int = 0) -> dict:
    """Evaluate one kind on LLaVA-format records (with reference answers; POPE and captions also need the
    ShapesWorld scene of each record). Returns a JSON-able dict with a "table" string for printing."""
    if kind not in KINDS:
        raise ValueError(f"eval kind '{kind}': expected one of {', '.join(KINDS)}")
    if kind == "multi-image":
        records = [r for r in records if len(r.images) > 1]
        if not records:
            raise ValueError("multi-image evaluation: no record has more than one image")
    if kind in ("vqa", "multi-image"):
        result = evaluate_vqa(model, processor, records, suffix, batch_size, progress=progress)
        result["table"] = format_table(result)
        return result
    if not any(isinstance(r.meta.get("scene"), dict) for r in records):
        raise ValueError(f"{kind} evaluation needs scene annotations (ShapesWorld records carry 'scene')")
    if kind == "pope":
        from .data import shapesworld as sw

        out = {}
        scenes = [sw.Scene.from_dict(r.meta["scene"]) for r in records if isinstance(r.meta.get("scene"), dict)]
        freq = sw.combo_frequencies(scenes)  # "popular": the most frequent objects of this data set
        for strategy in POPE_STRATEGIES:
            probes = pope_records(records, strategy, seed=seed, freq=freq)
            qs = questions(probes, suffix)
            answers = answer(model, processor, qs, batch_size, max_new_tokens=8, progress=progress)
            out[strategy] = pope_metrics(answers, [q["reference"] for q in qs])
        lines = [f"{'POPE':<12}{'n':>6}{'acc':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'yes':>8}"]
        lines += [f"{k:<12}{v['n']:>6}{v['accuracy']:>8.1%}{v['precision']:>8.1%}{v['recall']:>8.1%}"
                  f"{v['f1']:>8.1%}{v['yes_ratio']:>8.1%}" for k, v in out.items()]
        return {"pope": out, "table": "\n".join(lines)}
    from .data import shapesworld as sw

    recs = [r for r in records if isinstance(r.meta.get("scene"), dict) and len(r.images) == 1]
    qs = [{"messages": [{"role": "user", "content": "<image>\nDescribe the image briefly."}], "images": r.images}
          for r in recs]
    captions = answer(model, processor, qs, batch_size, max_new_tokens=64, progress=progress)
    scenes = [sw.Scene.from_dict(r.meta["scene"]) for r in recs]
    metrics = caption_metrics(captions, scenes)
    table = "\n".join(f"{k:<24}{v:>8.1%}" if isinstance(v, float) and k != "mentions_per_caption"
                      else f"{k:<24}{v:>8}" for k, v in metrics.items())
    return {"caption": metrics, "examples": [{"id": r.id, "objects": "; ".join(o.phrase() for o in scene.objects),
                                              "caption": c} for r, c, scene in zip(recs[:10], captions, scenes)],
            "table": table}


def score_answer_file(qs: list[dict], path) -> dict:
    """Score answers written elsewhere: a JSON list of {"id", "turn", "answer"}, one per question of `qs`."""
    from .utils import read_json

    rows = read_json(path, what="answer file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "answer"} <= set(r) for r in rows):
        raise ValueError(f"answer file '{path}': expected a JSON list of {{\"id\", \"turn\", \"answer\"}} objects")
    given = {(str(r["id"]), int(r.get("turn", 0))): str(r["answer"]) for r in rows}
    wanted = [(q["id"], q["turn"]) for q in qs]
    missing = [k for k in wanted if k not in given]
    extra = [k for k in given if k not in set(wanted)]
    if missing or extra:
        raise ValueError(f"answer file '{path}' does not match the questions: {len(missing)} questions have no "
                         f"answer (e.g. {missing[:3]}), {len(extra)} answers match no question (e.g. {extra[:3]})")
    return score(qs, [given[k] for k in wanted])


def eval_command(args) -> dict:
    """`minillava eval`: load, evaluate, print the table, write JSON."""
    from .data.records import load_records
    from .utils import write_json
    from .zoo import load_model

    records = load_records(args.data, args.images)[: args.limit]
    suffix = SHORT_ANSWER if args.short_answer else ""
    if args.answers:
        result = score_answer_file(questions(records, suffix), args.answers)
        result["table"] = format_table(result)
    else:
        model, processor = load_model(args.model)
        if args.template:
            processor = processor.with_template(args.template)
        result = run_eval(model, processor, records, args.kind, suffix)
    result.update(model=str(args.model), data=str(args.data), kind=args.kind, suffix=suffix,
                  template=args.template)
    print(result["table"])
    if args.out:
        write_json(args.out, result)
        print(f"results -> {args.out}")
    return result
