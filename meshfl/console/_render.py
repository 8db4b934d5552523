"""HTML: the Jinja2 templates (package data), plan source highlighted with Pygments, diffs."""

from __future__ import annotations

import datetime
import shlex
import time
from html import escape

import jinja2
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from ._chart import budget_chart, line_chart

_FORMATTER = HtmlFormatter(linenos="table", cssclass="source", wrapcode=True)
PYGMENTS_CSS = _FORMATTER.get_style_defs(".source")


def python_html(source: str) -> Markup:
    """`source` highlighted, with line numbers (Pygments escapes the code)."""
    return Markup(highlight(source, PythonLexer(), _FORMATTER))


def diff_html(lines: list[str]) -> Markup:
    """A unified diff with its added, removed and hunk lines marked for colour."""
    out = []
    for line in lines:
        kind = ("file" if line.startswith(("---", "+++")) else "hunk" if line.startswith("@@")
                else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append(f'<span class="d-{kind}">{escape(line)}</span>')
    return Markup('<pre class="diff">' + "".join(out) + "</pre>")  # each span is a block: a line


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: float | None) -> str:
    """"12 s ago", "3 min ago", ... or "-"."""
    if ts is None:
        return "-"
    return f"{duration(time.time() - ts)} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def chart(title: str, series: dict, emphasis: str | None = None) -> Markup:
    return Markup(line_chart(title, series, emphasis=emphasis))


def budget(summary: dict) -> Markup:
    return Markup(budget_chart(summary))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("meshfl.console", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(when=when, ago=ago, duration=duration, python=python_html, diff=diff_html,
                       shell=shlex.quote, budget=budget)
    env.globals.update(chart=chart, pygments_css=Markup(PYGMENTS_CSS))
    return env
