"""Display helpers the book's chapters share: source code, HTML tables, token masks and template renderings.

Display only: nothing here computes what a chapter measures. Each `show_*` function displays its result in a
notebook (IPython); the `*_html` functions return the HTML instead, for use anywhere. IPython and matplotlib
are imported inside the functions that need them, so importing minillava never requires either.

- code: `show_source` (a function's or class's source), `show_code`;
- tables: `show_table` / `table_html`, with `code` and `Markup` for cells that hold HTML;
- tokens: `show_mask` (one box per token, coloured by its label), `show_token_strip` (one row of cells per
  tokenized conversation), `show_renderings` (a template's text, supervised characters highlighted);
- images and text: `side_by_side` (images pasted in a row), `question_text`, `show_html`, `hide_progress_bars`.
"""

from __future__ import annotations

import html
import inspect
import textwrap

from .templates import IGNORE_INDEX, IMAGE_PLACEHOLDER

__all__ = ["Markup", "code", "hide_progress_bars", "mask_html", "question_text", "renderings_html", "show_code",
           "show_html", "show_mask", "show_renderings", "show_source", "show_table", "show_token_strip",
           "side_by_side", "table_html", "token_box"]


# ---- notebook output -----------------------------------------------------------------------------------------
def show_html(text: str) -> None:
    """Display an HTML string in the notebook."""
    from IPython.display import HTML, display

    display(HTML(text))


def show_code(text: str, language: str = "python") -> None:
    """Display `text` as a highlighted code block."""
    from IPython.display import Markdown, display

    display(Markdown(f"```{language}\n{text.rstrip()}\n```"))


def show_source(obj, until: str | None = None) -> None:
    """Display the source code of a function, method or class; with `until`, only what comes before the first
    line that starts with it (e.g. `until="    @property"` shows a dataclass's fields and docstring)."""
    src = textwrap.dedent(inspect.getsource(obj))
    if until is not None:
        lines = src.splitlines(keepends=True)
        cut = next((i for i, line in enumerate(lines) if i and line.startswith(until)), len(lines))
        src = "".join(lines[:cut])
    show_code(src)


def hide_progress_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (they freeze in a rendered page)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # (neither is needed to import minillava)
        return
    disable_progress_bars()
    hf_logging.disable_progress_bar()


# ---- tables ----------------------------------------------------------------------------------------------------
class Markup(str):
    """Text that is HTML already: a table cell holding it is shown as is, not escaped."""


CELL_STYLE = "padding:3px 10px;border-bottom:1px solid #ccc;text-align:left;vertical-align:top"


def _cell_html(value) -> str:
    """A cell's content: Markup as is; a list one item per line; anything else (a tuple such as a shape
    included) as escaped text."""
    if isinstance(value, Markup):
        return str(value)
    if isinstance(value, list):
        return "<br>".join(_cell_html(v) for v in value)
    return html.escape(str(value))


def table_html(header, rows, notes=None) -> str:
    """An HTML table. header: the column names; rows: lists of cells (a list cell shows one item per line,
    a `Markup` cell is HTML already, anything else is shown as escaped text); notes: one per row (or None),
    each shown in italics on a full-width line under its row."""
    def cells(tag, values):
        return "".join(f'<{tag} style="{CELL_STYLE}">{_cell_html(v)}</{tag}>' for v in values)

    body = []
    for row, note in zip(rows, notes or [None] * len(rows)):
        body.append(f"<tr>{cells('td', row)}</tr>")
        if note:
            body.append(f'<tr><td colspan="{len(header)}" style="{CELL_STYLE}"><i>{html.escape(note)}</i></td></tr>')
    return (f'<table class="table" style="border-collapse:collapse;font-size:13px"><thead><tr>{cells("th", header)}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table>')


def show_table(header, rows, notes=None) -> None:
    """Display a small HTML table (see `table_html` for what rows and notes may hold)."""
    show_html(table_html(header, rows, notes))


def code(value, limit: int | None = None) -> Markup:
    """A table cell showing `repr(value)` in monospace, so spaces and newlines are visible; a string longer
    than `limit` characters is cut to that length, ending in "..."."""
    if limit and isinstance(value, str) and len(value) > limit:
        value = value[:limit - 3] + "..."
    return Markup(f'<code style="white-space:pre-wrap;word-break:break-all">{html.escape(repr(value))}</code>')


# ---- tokens: what the loss sees ----------------------------------------------------------------------------------
BOX = "display:inline-block;margin:1px;padding:0 3px;border-radius:3px;font-family:monospace;font-size:12px"
TOKEN_STYLES = {"masked": "background:#e2e2e2;color:#555",
                "supervised": "background:#c6f6d5;outline:1px solid #38a169",
                "image": "background:#cfe2ff;outline:1px solid #3b6fd8",
                "special": "background:#fde2c4;color:#7a4a10"}


def token_box(text: str, kind: str) -> str:
    """One token (already HTML-escaped) as a coloured box; kind: masked, supervised, image or special."""
    return f'<span style="{BOX};{TOKEN_STYLES[kind]}">{text}</span>'


def mask_html(out: dict, tokenizer, title: str) -> str:
    """HTML of `Template.tokenize` output {"input_ids", "labels"}: one box per token, green where supervised,
    orange for masked special tokens, grey for other masked ones; a run of image tokens is one blue box.
    A space shows as "·", a newline as "↵"."""
    ids, labels = out["input_ids"], out["labels"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    special = set(tokenizer.all_special_ids) - {image_id}
    boxes, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:  # collapse a run of image tokens
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            boxes.append(token_box(f"&lt;image&gt; × {j - i}", "image"))
            i = j
            continue
        piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = html.escape(piece).replace(" ", "·").replace("\n", "↵")
        if labels[i] != IGNORE_INDEX:
            kind = "supervised"
        else:
            kind = "special" if ids[i] in special else "masked"
        boxes.append(token_box(piece, kind))
        i += 1
    n_sup = sum(y != IGNORE_INDEX for y in labels)
    legend = " ".join(token_box(kind, kind) for kind in TOKEN_STYLES)
    return (f"<p><b>{html.escape(title)}</b>: {len(ids)} tokens, {n_sup} supervised. Legend: {legend}</p>"
            f'<div style="line-height:1.9">{"".join(boxes)}</div>')


def show_mask(out: dict, tokenizer, title: str) -> None:
    """Display `Template.tokenize` output as one box per token, coloured by its label (see `mask_html`)."""
    show_html(mask_html(out, tokenizer, title))


STRIP_COLORS = {"masked text (BOS, system, user, tags)": "#d0d0d0", "image tokens": "#6fa8dc",
                "supervised (answers + end of turn)": "#38a169"}


def show_token_strip(rows, image_token_id: int, title: str) -> None:
    """A figure with one row of cells per tokenized conversation, rows: (name, input_ids, labels); each cell is
    a token, coloured as masked text, image token or supervised (`STRIP_COLORS`)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    width = max(len(ids) for _, ids, _ in rows)
    grid = np.zeros((len(rows), width))  # 0 none, 1 masked, 2 image, 3 supervised
    for r, (_, ids, labels) in enumerate(rows):
        for c, (i, y) in enumerate(zip(ids, labels)):
            grid[r, c] = 2 if i == image_token_id else 3 if y != IGNORE_INDEX else 1
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.4))
    ax.imshow(grid, cmap=ListedColormap(["white", *STRIP_COLORS.values()]), vmin=0, vmax=3, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{n} ({len(ids)})" for n, ids, _ in rows])
    ax.set_xlabel("token position")
    ax.set_title(title)
    handles = [Patch(color=c, label=label) for label, c in STRIP_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    plt.tight_layout(rect=(0, 0.1, 1, 1))
    plt.show()


CARD = ("border:1px solid #ccc;border-radius:6px;padding:6px 8px;background:#fafafa;font-family:monospace;"
        "font-size:12px;white-space:pre-wrap;word-break:break-word")
SUPERVISED = "background:#c6f6d5;outline:1px solid #38a169"


def renderings_html(items) -> str:
    """HTML cards, two per row, of items (name, template, messages): the template's rendering of the messages
    (`Template.segments`), supervised text in green, newlines shown as "↵"."""
    cards = []
    for name, template, messages in items:
        spans = []
        for text, supervised in template.segments(messages):
            text = html.escape(text).replace("\n", "↵\n")
            spans.append(f'<span style="{SUPERVISED}">{text}</span>' if supervised else text)
        cards.append(f'<div><b>{html.escape(name)}</b><div style="{CARD}">{"".join(spans)}</div></div>')
    legend = (f'<p>Green: <span style="{SUPERVISED}">supervised text</span> (the loss is computed on it); '
              "everything else is prompt. ↵ marks a newline.</p>")
    grid = "display:grid;grid-template-columns:1fr 1fr;gap:10px"
    return f'{legend}<div style="{grid}">{"".join(cards)}</div>'


def show_renderings(items) -> None:
    """Display template renderings with their supervised text highlighted (see `renderings_html`)."""
    show_html(renderings_html(items))


# ---- images and questions ------------------------------------------------------------------------------------------
def side_by_side(images, gap: int = 4):
    """PIL images (or image files) pasted left to right on white, `gap` px apart, tops aligned: one picture."""
    from PIL import Image

    images = [im if isinstance(im, Image.Image) else Image.open(im).convert("RGB") for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1),
                               max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def question_text(q: dict) -> str:
    """The words of a question (`evaluation.questions`): its last user message without the image placeholders
    (and the "Image 1: " labels of two-image questions) or the short-answer suffix."""
    import re

    from .evaluation import SHORT_ANSWER

    text = re.sub(r"(Image \d+: )?<image>\n?", "", q["messages"][-1]["content"])
    return text.replace(SHORT_ANSWER, "").strip()
