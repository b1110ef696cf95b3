"""report.html: the report as one self-contained page that opens offline.

Rendered from report.md (Python-Markdown, with its tables extension), so the
page and the Markdown never disagree. Every figure is embedded as a data URI
(no CDN, no second file to lose), and each is followed by a link to the CSV of
its data, which sits beside it in figures/.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

from .io import write_text

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
_IMAGE = re.compile(r'<img alt="(?P<alt>[^"]*)" src="(?P<src>[^"]+\.png)" ?/?>')


def _embed(match: re.Match, folder: Path) -> str:
    src = match["src"]
    data = base64.b64encode((folder / src).read_bytes()).decode()
    csv = Path(src).with_suffix(".csv")
    link = (f' <a href="{html.escape(csv.as_posix())}">data ({csv.name})</a>' if (folder / csv).exists() else "")
    return (f'<figure><img alt="{match["alt"]}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(match['alt'])}{link}</figcaption></figure>")


def render(markdown_text: str, folder: Path, title: str) -> str:
    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    body = _IMAGE.sub(lambda m: _embed(m, folder), body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html(report_md: Path) -> Path:
    """report.html beside report.md, from it."""
    text = Path(report_md).read_text()
    first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "mogvae report")
    return write_text(Path(report_md).with_suffix(".html"), render(text, Path(report_md).parent, first))
