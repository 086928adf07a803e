"""A Griffe extension for the API reference: it reads the docstrings as they are written for Sphinx's Napoleon.

- Sphinx roles (:class:`Policy`, :func:`~mt2st_lightning.heads.drop_heads`), which Markdown would print as they
  are, become the name as code (the last part only after a ``~``, as Sphinx shows it).
- An ``Args:`` entry that documents several parameters at once (``gamma0, eta, nu: the decay``), which Napoleon
  reads and Griffe does not, becomes one entry per parameter, each with that description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")
_SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Other Parameters):\s*$")
_SHARED_ENTRY = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(.*)$")


def _as_code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"``{target.rsplit('.', 1)[-1] if tilde else target}``"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_shared_entries(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if (header := _SECTION.match(line)) is not None:
            section_indent = len(header.group(1))
        elif line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None  # the section ended
        entry = _SHARED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        indent, names, first = entry.groups()
        # The description's further lines are the ones indented deeper than the entry.
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > len(indent)):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():
            end -= 1
        for name in re.split(r",\s*", names):
            out.append(f"{indent}{name}:{first}")
            out.extend(lines[i + 1:end])
        i = end
    return "\n".join(out)


class NapoleonDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _split_shared_entries(_ROLE.sub(_as_code, obj.docstring.value))
