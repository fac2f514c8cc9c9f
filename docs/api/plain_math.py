"""A Sphinx extension: read the package's docstrings as what they are, plain text with math.

Docstrings state formulas in ASCII (``||g_i||``, ``L*_i``, ``|1^T a|``), which reST would take
for substitution references and emphasis. Outside inline literals and ``>>>`` examples, this
escapes the characters reST would misread, so the page shows the formula as written.
"""

from __future__ import annotations

import re
from typing import Any

# Inline literals stay as they are; so do reST roles such as :func:`x`.
_LITERAL = re.compile(r"(``.+?``|:[a-z:]+:`[^`]+`)")
_SPECIAL = re.compile(r"([|*\\])")
# A word ending in "_" (``name_``) is a reST reference; escape the underscore.
_TRAILING_UNDERSCORE = re.compile(r"(?<=\w)_(?=\W|$)")


def _escape(text: str) -> str:
    pieces = _LITERAL.split(text)
    for index in range(0, len(pieces), 2):  # even pieces lie outside literals
        escaped = _SPECIAL.sub(r"\\\1", pieces[index])
        pieces[index] = _TRAILING_UNDERSCORE.sub(r"\\_", escaped)
    return "".join(pieces)


def escape_lines(lines: list[str]) -> None:
    """Escape, in place, every line that is not part of a doctest or a literal block."""
    in_example = False
    literal_indent: int | None = None
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        if stripped.startswith(">>>"):
            in_example = True
        elif not stripped:
            in_example = False
        if in_example:
            continue
        lines[index] = line[:indent] + _escape(stripped)
        if stripped.endswith("::"):
            literal_indent = indent


def _process(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    escape_lines(lines)


def setup(app: Any) -> dict[str, Any]:
    # Before napoleon (priority 500) turns "Args:" sections into fields: run first.
    app.connect("autodoc-process-docstring", _process, priority=100)
    return {"parallel_read_safe": True}
