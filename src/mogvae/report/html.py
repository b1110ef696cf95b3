"""report.html: the report as one self-contained page that opens offline and runs nothing.

Rendered from report.md (Python-Markdown, with its tables extension), so the
page and the Markdown never disagree. Every figure is embedded as a data URI
(no CDN, no second file to lose), and each is followed by a link to the CSV of
its data, which sits beside it in figures/.

Text that a user controls (a spec's file name, a grid value, anything read back
from a saved file) reaches the report, so the page is built in layers, each
enough on its own to keep a hostile name inert:

1. every such string is inserted through `md_text`, which escapes it for Markdown
   and for HTML, so it renders as exactly its characters;
2. the Markdown renderer passes no raw HTML through: `<` in report.md is text;
3. only figures that mogvae wrote, inside the report's own `figures/` folder, are
   embedded, and only links to their CSV files are kept;
4. a Content-Security-Policy forbids every script, and every request but the page's
   own inline style and embedded images.
"""
from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path

import markdown

from ..storage.files import UnreadableFile, read_bytes, write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# No script, no fetch, no frame, no form, no <base>: the only content is the inline style (by its hash)
# and the figures embedded as data URIs.
CSP = (f"default-src 'none'; script-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src data:; "
       "base-uri 'none'; form-action 'none'")       # (frame-ancestors is ignored in a <meta> policy)

FIGURE_NAME = re.compile(r"figures/[A-Za-z0-9._+=-]{1,200}\.png")   # what mogvae names its figures (runs.sweep._label)
MAX_FIGURE_BYTES = 64 * 2**20
_IMAGE = re.compile(r"<img\b[^>]*>")                     # every image the renderer made, whatever its attributes
_ATTRIBUTE = re.compile(r'\s(?P<name>[a-z]+)="(?P<value>[^"]*)"')
_LINK = re.compile(r'<a href="(?P<href>[^"]*)"')
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_text(value) -> str:
    """Any text from a user, a file name or a saved file, as Markdown that renders as
    exactly that text: control characters and line breaks become spaces (a newline
    would end a table row), Markdown's specials are backslash-escaped, and HTML's
    (& < >) become entities."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return html.escape(_MARKDOWN_SPECIAL.sub(r"\\\1", text), quote=False)


def _figure_bytes(folder: Path, src: str) -> bytes | None:
    """A figure's bytes, if `src` names one mogvae writes (figures/NAME.png) and it is a
    regular file inside `folder` (no link out, no FIFO): else None, and it is not embedded."""
    if not FIGURE_NAME.fullmatch(src):
        return None
    path = folder / src
    if path.parent.is_symlink() or path.parent.resolve() != (folder / "figures").resolve():
        return None
    try:
        return read_bytes(path, MAX_FIGURE_BYTES)
    except UnreadableFile:
        return None


def _embed(match: re.Match, folder: Path) -> str:
    """An <img> as its figure embedded, if it is one of this report's own; else dropped, its alt kept."""
    attributes = {m["name"]: m["value"] for m in _ATTRIBUTE.finditer(match[0])}
    src, alt = html.unescape(attributes.get("src", "")), attributes.get("alt", "")
    data = _figure_bytes(folder, src)
    if data is None:
        return f"<em>[figure {alt} not embedded: not a figure of this report]</em>"
    csv = src[:-len(".png")] + ".csv"
    link = f' <a href="{html.escape(csv)}">data ({html.escape(csv[len("figures/"):])})</a>' if (folder / csv).is_file() else ""
    return (f'<figure><img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{alt}{link}</figcaption></figure>")


def _keep_own_links(match: re.Match) -> str:
    """Only links to a figure's CSV survive; any other href is dropped (the text stays)."""
    href = html.unescape(match["href"])
    return match[0] if FIGURE_NAME.fullmatch(href[:-len(".csv")] + ".png") and href.endswith(".csv") else "<a"


def _renderer() -> markdown.Markdown:
    """Python-Markdown with tables, and without raw HTML or autolinks: `<` in the text stays text."""
    md = markdown.Markdown(extensions=["tables"], output_format="html")
    md.preprocessors.deregister("html_block")
    for pattern in ("html", "autolink", "automail"):
        md.inlinePatterns.deregister(pattern)
    return md


def render(markdown_text: str, folder: Path, title: str) -> str:
    body = _renderer().convert(markdown_text)
    body = _IMAGE.sub(lambda m: _embed(m, folder), body)
    body = _LINK.sub(_keep_own_links, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html(report_md: Path, title: str) -> Path:
    """report.html beside report.md, from it; `title` as plain text (escaped here)."""
    text = Path(report_md).read_text()
    return write_text(Path(report_md).with_suffix(".html"), render(text, Path(report_md).parent, title))
