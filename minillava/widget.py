"""A chat widget for notebooks (Jupyter, Colab): attach an image, ask, and watch the answer stream in.

`ChatWidget(session)` puts a `ChatSession` behind a few ipywidgets: an image upload (and a menu of example
images), a question box with Send, Reset, the conversation with thumbnails, and the answer as it is generated.
Its handlers are plain methods (`on_upload`, `on_pick`, `on_send`, `on_reset`), so tests and nbmake drive it
without a browser. Live widgets do not run in a rendered book: `transcript_html(session)` gives the same
conversation as static HTML (images as base64 PNG thumbnails) for a notebook to display.
"""

from __future__ import annotations

import base64
import html
import io

from .templates import IMAGE_PLACEHOLDER

_STYLE = "font-family:sans-serif;font-size:14px;line-height:1.4"
_BUBBLE = "margin:4px 0;padding:6px 10px;border-radius:8px;white-space:pre-wrap;background:{}"
NO_EXAMPLE = "(example image)"


def thumbnail_html(image, size: int = 96) -> str:
    """A PIL image -> an <img> tag holding a PNG thumbnail (at most `size` px a side) as base64."""
    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="image" style="max-height:{size}px;vertical-align:top">'


def _bubble(who: str, body: str) -> str:
    colour = "#eef3fb" if who == "you" else "#f4f4f4"
    return f'<div style="{_BUBBLE.format(colour)}"><b>{who}:</b> {body}</div>'


def _question_html(content: str, images: list, size: int) -> str:
    """The question's text (escaped) with each "<image>" placeholder replaced by its image's thumbnail."""
    first, *rest = [html.escape(part) for part in content.split(IMAGE_PLACEHOLDER)]
    return first + "".join(thumbnail_html(im, size) + part for im, part in zip(images, rest))


def transcript_html(session, size: int = 96) -> str:
    """The conversation of a `ChatSession` as static HTML: questions with thumbnails of their images, answers."""
    rows = [_bubble("you", _question_html(m["content"], m["images"], size)) if m["role"] == "user"
            else _bubble("assistant", html.escape(m["content"])) for m in session.history]
    return f'<div style="{_STYLE}">{"".join(rows) or "<i>(no conversation yet)</i>"}</div>'


def _problem(error: ValueError, name: str) -> str:
    """What `load_image`'s error says is wrong with image `name`, without its "image 'NAME': " prefix."""
    return str(error).removeprefix(f"image '{name}': ")


class ChatWidget:
    """ipywidgets around a `ChatSession`. Display it as the last expression of a cell.

    examples: optional {name: PIL image} offered in a dropdown beside the upload button.
    Images attached (uploaded or picked) go with the next question, then the list is cleared.
    """

    def __init__(self, session, examples: dict | None = None):
        import ipywidgets as w

        self.session = session
        self.examples = dict(examples or {})
        self.pending: list[tuple[str, object]] = []  # (name, PIL image) for the next question
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload image")
        self.picker = w.Dropdown(options=[NO_EXAMPLE, *self.examples], layout=w.Layout(width="200px"))
        self.question = w.Text(placeholder="Ask about the image...", layout=w.Layout(width="60%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.reset_button = w.Button(description="Reset")
        self.status = w.HTML()  # attached images, errors
        self.history = w.HTML(transcript_html(session))
        self.answer = w.HTML()  # the answer being streamed
        self.upload.observe(self.on_upload, names="value")
        self.picker.observe(self.on_pick, names="value")
        self.send_button.on_click(self.on_send)
        self.reset_button.on_click(self.on_reset)
        tools = [self.upload] + ([self.picker] if self.examples else [])
        self.box = w.VBox([w.HBox(tools), self.status, self.history, self.answer,
                           w.HBox([self.question, self.send_button, self.reset_button])])

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)

    def _say(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#555"
        self.status.value = f'<span style="color:{colour}">{html.escape(text)}</span>' + "".join(
            thumbnail_html(im, 48) for _, im in self.pending)

    def _attach(self, name: str, source, what: str = "image") -> None:
        """Load `source` (bytes or PIL image) for the next question, or say what is wrong with `what` 'name'."""
        try:
            self.pending.append((name, self.session.processor.image_processor.load(source, name=name)))
        except ValueError as e:
            self._say(f"{what} '{name}': {_problem(e, name)} -- not attached; upload a PNG or JPEG image", error=True)
            return
        self._say("attached for the next question: " + ", ".join(n for n, _ in self.pending))

    # ---- handlers (called by the widgets, or directly) ----------------------------------------------------
    def on_upload(self, change=None) -> None:
        """Attach the uploaded file(s): ipywidgets 8's value, a tuple of {"name", "content": memoryview, ...},
        or ipywidgets 7's {name: {"content": bytes, ...}} (older Colab)."""
        value = change["new"] if change else self.upload.value
        files = [{"name": k, **v} for k, v in value.items()] if isinstance(value, dict) else list(value)
        for f in files:
            self._attach(f["name"], bytes(f["content"]), what="upload")
        if files and not isinstance(value, dict):
            self.upload.value = ()  # so that the same file can be uploaded again

    def on_pick(self, change=None) -> None:
        """Attach the example image chosen in the dropdown."""
        name = change["new"] if change else self.picker.value
        if name in self.examples:
            self._attach(name, self.examples[name])
            self.picker.value = NO_EXAMPLE  # so that the same example can be picked again

    def on_send(self, _button=None) -> None:
        """Ask the question in the text box with the attached images, streaming the answer into the widget."""
        question, images = self.question.value, [im for _, im in self.pending]
        try:
            pieces = self.session.stream(question, images=images)  # checks the input before anything changes
        except (ValueError, FileNotFoundError) as e:
            self._say(str(e), error=True)
            return
        self.question.value, self.pending = "", []
        self._say("")
        content = question if IMAGE_PLACEHOLDER in question else IMAGE_PLACEHOLDER * len(images) + question
        asked = _bubble("you", _question_html(content.strip(), images, 96))  # as the transcript will show it
        text = ""
        for piece in pieces:
            text += piece
            answer = _bubble("assistant", html.escape(text) + "\u258c")
            self.answer.value = f'<div style="{_STYLE}">{asked}{answer}</div>'
        self.answer.value = ""
        self.history.value = transcript_html(self.session)

    def on_reset(self, _button=None) -> None:
        """Start a new conversation."""
        self.session.reset()
        self.pending = []
        self.question.value = ""
        self._say("")
        self.history.value = transcript_html(self.session)
