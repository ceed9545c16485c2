"""The book: every chapter listed, committed without outputs, opening with the Colab badge and install cell;
and, once built (`make book`), every rendered chapter page checked in headless Chromium."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HTML = os.environ.get("MINILLAVA_BOOK_HTML")  # set by `make check-book` after a build


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] for part in toc["parts"] for c in part["chapters"]]


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def test_every_notebook_is_in_the_toc_and_every_entry_exists():
    listed = toc_files()
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml"
    for entry in listed:
        assert list(ROOT.glob(entry + ".*")), f"_toc.yml lists {entry}, which does not exist"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_badge_and_colab_install(nb):
    cells = json.loads(nb.read_text())["cells"]
    first, second = "".join(cells[0]["source"]), "".join(cells[1]["source"])
    url = repository_url().replace("https://github.com/", "https://colab.research.google.com/github/")
    assert re.match(r"# \d+\. ", first), "the first cell starts with '# N. Title'"
    assert f"{url}/blob/main/notebooks/{nb.name}" in first, "Colab badge must point at _config.yml's repository"
    badge = re.search(r"!\[Open In Colab\]\(([^)]+)\)", first).group(1)
    assert (nb.parent / badge).is_file(), f"the badge image is shipped (offline, no remote image): {badge}"
    assert '"google.colab" in sys.modules' in second and repository_url() in second
    assert any("import minillava" in "".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(nb):
    for cell in json.loads(nb.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "clear the outputs"


def chapter_pages() -> list[Path]:
    return [Path(HTML) / "notebooks" / f"{nb.stem}.html" for nb in NOTEBOOKS]


@pytest.mark.skipif(not HTML, reason="set MINILLAVA_BOOK_HTML to a built book (make check-book does)")
@pytest.mark.parametrize("page", chapter_pages() if HTML else [], ids=lambda p: p.stem)
def test_rendered_chapter_in_chromium(page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (apt-get install chromium)"
    assert page.is_file(), f"{page} was not built"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
             "--virtual-time-budget=5000", "--window-size=1280,2000"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    outputs = re.findall(r'<div class="cell_output.*?</div>\s*</div>\s*</div>', dom, flags=re.S) or [dom]
    text = "\n".join(outputs)
    assert len(re.findall(r"<img[^>]+(?:image/png|\.png|\.svg)", dom)) >= 1, "a chapter shows figures"
    assert "Traceback (most recent call last)" not in text, "an error output was rendered"
    assert "_static/minillava.css" in dom, "the book's stylesheet (long code lines wrap) is not linked"
    assert not re.search(r"\b0%\|", text), "a progress bar froze at 0%"
    shots = Path(HTML).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    subprocess.run(flags + [f"--screenshot={shots / (page.stem + '.png')}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert (shots / f"{page.stem}.png").stat().st_size > 10_000


@pytest.mark.skipif(not HTML, reason="set MINILLAVA_BOOK_HTML to a built book (make check-book does)")
def test_formulas_render_offline(tmp_path):
    """MathJax ships inside the book (sphinx-mathjax-offline), so the Performance page's formulas typeset with
    no network: Chromium runs with networking off, and the page must hold MathJax's output, not raw TeX."""
    page = Path(HTML) / "book" / "performance.html"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (apt-get install chromium)"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", f"--user-data-dir={tmp_path}", "--proxy-server=127.0.0.1:9",
                          "--virtual-time-budget=8000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "_static/mathjax/tex-chtml.js" in dom, "MathJax is not served from the book"
    assert "<mjx-container" in dom and "\\(" not in re.sub(r"<script.*?</script>", "", dom, flags=re.S)


MYST_LEFTOVERS = re.compile(r"`{3,}\s*\{[\w-]+\}|\{(?:cite:\w+|doc|ref|numref|term|math)\}`|^\s*:class:", re.M)


def unrendered_myst(page_html: str) -> list[str]:
    """MyST markup left as text in a rendered page (a directive fence, a role, a directive option): what a broken
    list or fence nearby leaves behind, which Sphinx does not warn about. Code blocks and scripts are skipped."""
    body = re.sub(r"<(script|style|pre)\b.*?</\1>", "", page_html, flags=re.S)
    return MYST_LEFTOVERS.findall(html.unescape(re.sub(r"<[^>]+>", "", body)))


def test_unrendered_myst_is_found():
    broken = "<p>Then:</p><p>````{admonition} Solution\n:class: dropdown</p><p>see {cite:p}`liu2023visual`</p>"
    assert len(unrendered_myst(broken)) == 3
    assert unrendered_myst("<pre>```{admonition} in a code block</pre><p>an admonition, rendered</p>") == []


@pytest.mark.skipif(not HTML, reason="set MINILLAVA_BOOK_HTML to a built book (make check-book does)")
def test_no_page_shows_unrendered_myst():
    pages = sorted(Path(HTML).glob("notebooks/*.html")) + sorted(Path(HTML).glob("book/*.html"))
    assert len(pages) >= len(NOTEBOOKS)
    for page in pages:
        found = unrendered_myst(page.read_text())
        assert not found, f"{page.name} shows MyST markup as text: {found[:3]}"
