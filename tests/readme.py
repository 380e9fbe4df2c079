"""README.rst as its reader sees it: sections, code blocks, and the files they make.

A code block whose first line names a file (``# proj/asgi.py`` in Python,
``{# rooms/templates/rooms/room.html #}`` in a template) is that file, whole, as
the reader would paste it. A first line that goes on with ``: add`` (``#
proj/settings.py: add to what startproject wrote``) is added to the file instead;
in it, a line ``...,`` stands for what the list already held. The tests run
these blocks as they are written, never a copy of them.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"

_DIRECTIVE = re.compile(r"^\.\. code-block::\s*(?P<language>\S*)\s*$")
_FILE_LINE = re.compile(
    r"^(?:# |\{# )(?P<path>[\w.-]+(?:/[\w.-]+)+|[\w-]+\.\w+)"
    r"(?P<add>: add\b[^#]*)?(?: #\})?$"
)
_TITLE_UNDERLINE = re.compile(r"^([=\-~^])\1{2,}$")


@dataclass(frozen=True)
class Block:
    """A ``.. code-block::`` of the README: its language, its text, its line."""

    language: str
    text: str
    line: int

    @property
    def path(self) -> str | None:
        """The file the block is, by its first line; None for a plain example."""
        match = _FILE_LINE.match(self.text.split("\n", 1)[0])
        return match["path"] if match else None

    @property
    def adds(self) -> bool:
        """Whether the block is added to its file rather than being all of it."""
        match = _FILE_LINE.match(self.text.split("\n", 1)[0])
        return bool(match and match["add"])


def text() -> str:
    """README.rst, as it is now."""
    return README.read_text()


def blocks(source: str | None = None) -> list[Block]:
    """Every ``.. code-block::`` of the README (or of ``source``), in order."""
    lines = (text() if source is None else source).splitlines()
    found = []
    for number, line in enumerate(lines):
        directive = _DIRECTIVE.match(line)
        if not directive:
            continue
        body = []
        for following in lines[number + 1 :]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        found.append(Block(directive["language"], code, number + 1))
    return found


def block_containing(snippet: str) -> Block:
    """The one code block of the README whose text contains ``snippet``."""
    found = [block for block in blocks() if snippet in block.text]
    assert len(found) == 1, f"{len(found)} README blocks contain {snippet!r}"
    return found[0]


def sections(source: str | None = None) -> dict[str, str]:
    """The README's sections and subsections by title, each with its own text."""
    lines = (text() if source is None else source).splitlines()
    starts = [
        number
        for number in range(1, len(lines))
        if _TITLE_UNDERLINE.match(lines[number])
        and lines[number - 1].strip()
        and len(lines[number]) >= len(lines[number - 1].rstrip())
    ]
    found = {}
    for index, start in enumerate(starts):
        end = starts[index + 1] - 1 if index + 1 < len(starts) else len(lines)
        found[lines[start - 1].strip()] = "\n".join(lines[start + 1 : end])
    return found


def write_project(directory: Path, extra_settings: str = "") -> list[str]:
    """Write the README's file blocks into the project in ``directory``.

    ``directory`` holds what ``startproject`` and ``startapp`` made. Blocks
    that add to a file are appended to it in README order, their ``...,``
    lines standing for the list's previous value; ``extra_settings`` is added
    to the settings after them. Returns the paths written, in order.
    """
    written: list[str] = []
    for block in blocks():
        path = block.path
        if path is None:
            continue
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if block.adds:
            # INSTALLED_APPS = [..., "channels"]: what startproject listed,
            # then the README's apps.
            name = _assigned_list(block.text)
            code = re.sub(
                r"^(\s*)\.\.\.,.*$", rf"\1*{name},", block.text, flags=re.MULTILINE
            )
            with target.open("a") as file:
                file.write("\n\n" + code)
        else:
            assert path not in written, f"README.rst writes {path} whole twice"
            target.write_text(block.text)
        written.append(path)
    if extra_settings:
        settings = directory / "proj" / "settings.py"
        with settings.open("a") as file:
            file.write("\n\n" + extra_settings)
    return written


def _assigned_list(code: str) -> str:
    """The name assigned the list holding a ``...,`` line ("" when none does)."""
    lines = code.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*\.\.\.,", line):
            for previous in reversed(lines[:number]):
                assignment = re.match(r"^(\w+)\s*=\s*\[", previous)
                if assignment:
                    return assignment[1]
            raise AssertionError(f"a '...,' line outside a list:\n{code}")
    return ""


def block_line(start: str) -> str:
    """The README's one line, in a literal block or not, that starts with ``start``."""
    found = [
        line.strip() for line in text().splitlines() if line.strip().startswith(start)
    ]
    assert len(found) == 1, f"{len(found)} README lines start with {start!r}"
    return found[0]
