"""ShapesWorld: a seeded synthetic world of coloured shapes, and every dataset the book trains on.

LLaVA learns from images paired with text: captions in stage 1 (LCS-558K) and instruction conversations in
stage 2 (LLaVA-Instruct-150K, llava_v1_5_mix665k). Real images need GPUs; ShapesWorld is small enough for a
2-core CPU and still asks LLaVA's kinds of questions. An image is a 3x3 grid holding 1 to 4 shapes (circle,
square, triangle, star) in six colours and two sizes, on a pale textured background. Everything an answer
depends on lives in a `Scene`, so every answer is computed, exact and short ("Red.", "3.", "Top left.").

* The world: `sample_scene`, `render` (`paint`, `geometry`, `polygon`), `bbox`, `caption`, `describe`, `change_scene`.
* In memory: `generate_records(split, n, seed)` -> caption and instruction records (LLaVA's "conversation",
  "detail" and "reasoning" kinds, plus two-image questions) and the scene of every image they name;
  `text_chats(n, seed)` -> text-only chats (scenes told in words, `tell`) for pretraining the language model.
* On disk: `build(out_dir)` or `python -m minillava.data.shapesworld OUT_DIR` writes LLaVA JSON + PNGs.
* Evaluation that reads the scenes: POPE probes, caption checks, CLIP's zero-shot prompts, `evaluate`.

The modules: `scenes` (the world), `questions` (one question and its answer, with its phrasings),
`instructions` (conversations and records), `build` (files), `probes` (evaluation).

Every answer turn is tagged in the record's extra fields: "qtypes" (one per answer), "kind" and "scene".
The "compositional" split draws the `HELD_OUT` colour/shape pairs (a purple star, an orange triangle), which
the other splits never draw nor mention.
"""
from .build import build, built_with, ensure_built, main
from .instructions import SplitData, generate_records, tell, text_chats
from .probes import (
    EVAL_KINDS,
    POPE_STRATEGIES,
    SHORT_TYPES,
    caption_mentions,
    caption_metrics,
    evaluate,
    multiturn,
    no_image,
    object_prompts,
    pope_records,
    short_answer_records,
)
from .questions import MORE_PHRASINGS, NO_IMAGE, NO_IMAGE_HELD_OUT, PHRASINGS, Ctx, short_form
from .scenes import (
    BRIEF_INSTRUCTIONS,
    COLORS,
    COOCCUR,
    COOCCUR_P,
    DETAIL_INSTRUCTIONS,
    GENERATOR,
    HELD_OUT,
    IMAGE,
    KIND_WEIGHTS,
    KINDS,
    NATURAL_WEIGHTS,
    POSITIONS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    SPLITS,
    SUPERSAMPLE,
    Background,
    Obj,
    Scene,
    absent_objects,
    bbox,
    caption,
    change_scene,
    combo_frequencies,
    cooccurrence_counts,
    describe,
    geometry,
    hard_negative,
    objects_present,
    paint,
    polygon,
    render,
    render_background,
    sample_scene,
)
