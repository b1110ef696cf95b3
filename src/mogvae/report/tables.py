"""Markdown tables that fit the page: a report's table wider than MAX_CHARS characters (about
1,150 pixels in report.html at its font: no table scrolls sideways at 1,280) is split by
columns into tables that fit, each repeating the row's key columns (the leading ones that hold
names and settings rather than measured values)."""
from __future__ import annotations

MAX_CHARS = 145     # measured in Chromium: about 7.9 pixels per character of a cell, padding included
PADDING = 3         # a cell's border and padding, in characters


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (mogvae escapes `|` inside cells, md_text)."""
    inner = line.strip()[1:-1]
    cells, current, escaped = [], "", False
    for ch in inner:
        if ch == "|" and not escaped:
            cells.append(current.strip())
            current = ""
        else:
            current += ch
        escaped = ch == "\\" and not escaped
    return [*cells, current.strip()]


def _is_measure(values: list[str]) -> bool:
    """A column of measured values: mean ± sd, or an interval [low, high]."""
    return sum(("±" in v or "[" in v) for v in values) * 2 >= max(1, len(values))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def split_table(table: list[str], max_chars: int = MAX_CHARS) -> list[str]:
    """One Markdown table (header, rule, rows) as one or more tables of at most max_chars."""
    head, rows = _cells(table[0]), [_cells(line) for line in table[2:]]
    if any(len(r) != len(head) for r in rows):
        return table                                   # not a table mogvae wrote: leave it
    widths = [max(len(c) for c in [h, *(r[i] for r in rows)]) + PADDING for i, h in enumerate(head)]
    if sum(widths) <= max_chars:
        return table
    keys = 0
    while keys < len(head) - 1 and not _is_measure([r[keys] for r in rows]):
        keys += 1
    keys = max(keys, 1)
    groups = _balanced(widths, keys, max_chars)
    out = []
    for n, group in enumerate(groups):
        columns = [*range(keys), *group]
        out += ([""] if n else []) + [_row([head[i] for i in columns]), "|" + "---|" * len(columns),
                                      *(_row([r[i] for i in columns]) for r in rows)]
    return out


def _balanced(widths: list[int], keys: int, max_chars: int) -> list[list[int]]:
    """The value columns in as few consecutive groups as fit beside the keys (greedily counted),
    of about equal numbers of columns (no lone column left over), or the greedy groups where an
    even split would not fit."""
    greedy, current = [], []
    for i in range(keys, len(widths)):
        if current and sum(widths[:keys]) + sum(widths[j] for j in current) + widths[i] > max_chars:
            greedy.append(current)
            current = []
        current.append(i)
    greedy.append(current)
    columns, n = list(range(keys, len(widths))), len(greedy)
    even = [columns[round(k * len(columns) / n):round((k + 1) * len(columns) / n)] for k in range(n)]
    fits = all(sum(widths[:keys]) + sum(widths[j] for j in g) <= max_chars for g in even)
    return even if fits else greedy


def fit_tables(lines: list[str], max_chars: int = MAX_CHARS) -> list[str]:
    """Every table in a report's lines split to fit (split_table); other lines unchanged."""
    out, table = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out += split_table(table, max_chars) if len(table) > 2 else table
            table = []
        out.append(line)
    return out[:-1]
