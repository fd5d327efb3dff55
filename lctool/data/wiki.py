"""MediaWiki XML dump -> one plain-prose document per article.

The cleaner keeps what a reader sees in the article body: link texts, bold/italic words, headings
as plain lines, list items without their markers, the text of a few inline templates that stand for
words (`{{convert|5|km}}`, `{{lang|fr|mot}}`, ...). It drops templates, tables, references, files,
categories, maths, galleries, HTML and the trailing reference sections.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET

from lctool.errors import LctoolError

MIN_ARTICLE_CHARS = 500

# Sections after which an article is references and link lists, not prose.
TRAILING_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "footnotes",
    "bibliography", "sources", "citations", "notes and references", "works cited",
    "selected bibliography", "primary sources", "secondary sources", "other uses",
}  # fmt: skip

# Link targets with these prefixes are media, categories or interwiki links, not words of the text.
DROPPED_LINK_NAMESPACES = {"file", "image", "media", "category"}

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSING_TAG = re.compile(r"<(?:ref|references)\b[^>]*/\s*>", re.I)
# Elements whose content is not prose: citations, maths, markup galleries, code listings.
_DROPPED_ELEMENTS = re.compile(
    r"<(ref|references|math|gallery|timeline|score|source|syntaxhighlight|imagemap|chem|ce|hiero|graph)\b"
    r"[^>]*>.*?</\1\s*>",
    re.I | re.S,
)
_LINE_BREAK = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
# A caption may hold single brackets ("Bicyclo[1.1.0]butane"), never a nested [[link]].
_INTERNAL_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"\bhttps?://\S+")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_BEHAVIOUR_SWITCH = re.compile(r"__[A-Z]+__")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([,.;:!?)\]])")
_SPACE_AFTER_OPENING = re.compile(r"([(\[])[ \t]+")
_REPEATED_PUNCTUATION = re.compile(r"([,;])(?:\s*[,;])+")
# "(French: ; born 1900)" once the pronunciation template inside is gone.
_DANGLING_SEPARATOR = re.compile(r"\s*[,;:]+\s*(?=\))|(?<=\()\s*[,;:]+\s*")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$|^simple$")


def parse_dump(compressed: bytes) -> list[tuple[str, str]]:
    """(title, text) of every article of a bz2-compressed MediaWiki XML dump, in dump order."""
    try:
        root = ET.fromstring(bz2.decompress(compressed))
    except (OSError, ValueError, ET.ParseError) as exc:
        raise LctoolError(f"the Wikipedia dump is not a readable bz2 MediaWiki XML file: {exc}") from exc
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title") or ""
        markup = page.findtext(f"{ns}revision/{ns}text") or ""
        if not _is_prose_article(title, markup):
            continue
        text = clean_article(title, markup)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles.append((title, text))
    return articles


def _is_prose_article(title: str, markup: str) -> bool:
    """False for disambiguation pages and lists, which are link lists rather than prose."""
    if "(disambiguation)" in title or title.startswith("List of "):
        return False
    return re.search(r"\{\{\s*(disambig|dab\b|disambiguation)", markup, re.I) is None


def clean_article(title: str, markup: str) -> str:
    """The article as plain paragraphs separated by blank lines, starting with its title."""
    text = _COMMENT.sub("", markup)
    text = _SELF_CLOSING_TAG.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = strip_templates_and_tables(text)
    text = _replace_internal_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _LINE_BREAK.sub("\n", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _BEHAVIOUR_SWITCH.sub("", text)
    text = html.unescape(text)
    return "\n\n".join([title, *_paragraphs(text)])


def _paragraphs(text: str) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []

    def close_paragraph() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw_line in text.split("\n"):
        heading = _HEADING.match(raw_line.strip())
        if heading:
            close_paragraph()
            if heading.group(2).strip().lower() in TRAILING_SECTIONS:
                break
            paragraphs.append(_tidy(heading.group(2)))
            continue
        line = raw_line.strip()
        is_list_item = line[:1] in ("*", "#", ":", ";")
        line = _tidy(line.lstrip("*#:; "))
        if not line or line in ("|", "-", "!"):
            close_paragraph()
            continue
        if is_list_item:
            close_paragraph()
            paragraphs.append(line)
        else:
            current.append(line)
    close_paragraph()
    # A heading left with no text under it (its section was all tables or templates) is noise.
    kept = [p for i, p in enumerate(paragraphs) if not _is_orphan_heading(paragraphs, i)]
    return [p for p in kept if _has_words(p)]


def _is_orphan_heading(paragraphs: list[str], i: int) -> bool:
    is_heading = len(paragraphs[i]) < 80 and not paragraphs[i].endswith((".", ":", "?", "!"))
    next_is_heading = i + 1 == len(paragraphs) or (
        len(paragraphs[i + 1]) < 80 and not paragraphs[i + 1].endswith((".", ":", "?", "!"))
    )
    return is_heading and next_is_heading and len(paragraphs[i].split()) <= 6


def _has_words(paragraph: str) -> bool:
    return sum(ch.isalpha() for ch in paragraph) >= 3


def _tidy(line: str) -> str:
    line = _SPACES.sub(" ", line)
    for _ in range(2):  # removing "( )" can leave "( ; )" outside it empty in turn
        line = _EMPTY_BRACKETS.sub("", line)
        line = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", line)
        line = _SPACE_AFTER_OPENING.sub(r"\1", line)
        line = _REPEATED_PUNCTUATION.sub(r"\1", line)
        line = _DANGLING_SEPARATOR.sub("", line)
    return _SPACES.sub(" ", line).strip()


def _replace_internal_links(text: str) -> str:
    # Innermost first, so a file caption's links become text before the file link is dropped whole.
    while True:
        replaced = _INTERNAL_LINK.sub(_link_text, text)
        if replaced == text:
            return replaced
        text = replaced


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    prefix, colon, _ = target.strip().partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in DROPPED_LINK_NAMESPACES or _LANGUAGE_CODE.match(prefix)):
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    # [[wikt:word]] and [[:Category:X]] show their last part.
    return target.lstrip(":").split(":")[-1] if colon else target


def strip_templates_and_tables(text: str) -> str:
    """Replace every outermost `{{template}}` by its rendered words and drop every `{| table |}`.

    An opener that is never closed drops the rest of the text: in a dump that happens only to
    truncated articles, and leaving half a template in would put markup into the corpus.
    """
    out: list[str] = []
    stack: list[str] = []
    template_start = 0
    i = 0
    while i < len(text):
        two = text[i : i + 2]
        if two == "{{" or (two == "{|" and (not stack or stack[-1] == "{|" or _at_line_start(text, i))):
            if not stack and two == "{{":
                template_start = i + 2
            stack.append(two)
            i += 2
        elif stack and two == "}}" and stack[-1] == "{{":
            stack.pop()
            if not stack:
                out.append(render_template(text[template_start:i]))
            i += 2
        elif stack and two == "|}" and stack[-1] == "{|":
            stack.pop()
            i += 2
        else:
            if not stack:
                out.append(text[i])
            i += 1
    return "".join(out)


def _at_line_start(text: str, i: int) -> bool:
    return i == 0 or text[text.rfind("\n", 0, i) + 1 : i].strip() == ""


def render_template(body: str) -> str:
    """The words an inline template stands for; empty for citations, boxes and maintenance tags."""
    name, *args = [part.strip() for part in _split_top_level(body, "|")]
    name = name.lower().replace("_", " ")
    positional = [strip_templates_and_tables(a) for a in args if not _is_named_argument(a)]
    if name in WORD_TEMPLATES:
        return WORD_TEMPLATES[name]
    if name == "convert" and len(positional) >= 2:
        return f"{positional[0]} {positional[1]}"
    if name in ("as of",) and positional:
        return "As of " + " ".join(positional[:3])
    if name in ("c.", "circa") and positional:
        return "c. " + positional[0]
    if name == "frac" and positional:
        return "/".join(positional[:3])
    if name.startswith("lang-") or name in LAST_ARGUMENT_TEMPLATES:
        return positional[-1] if positional else ""
    if name in FIRST_ARGUMENT_TEMPLATES:
        return positional[0] if positional else ""
    return ""


WORD_TEMPLATES = {
    "'s": "'s", "'": "'", "nbsp": " ", "snd": " – ", "spaced ndash": " – ", "ndash": "–",
    "mdash": "—", "!": "|", "pipe": "|", "=": "=", "·": " · ", "dot": " · ", "clear": "",
}  # fmt: skip
LAST_ARGUMENT_TEMPLATES = {"lang", "transl", "transliteration", "vr", "keypress", "abbr"}
FIRST_ARGUMENT_TEMPLATES = {
    "nowrap", "nobr", "small", "smaller", "big", "nihongo", "val", "nts", "dts", "sub", "sup",
    "angbr", "flag", "flagcountry", "sic", "nastaliq", "ill", "interlanguage link",
    "math", "mvar", "var", "em", "strong", "vanchor", "visible anchor", "script", "lnum", "nobold",
}  # fmt: skip


def _is_named_argument(argument: str) -> bool:
    name, eq, _ = argument.partition("=")
    return bool(eq) and re.fullmatch(r"[\w \-]+", name.strip()) is not None


def _split_top_level(body: str, separator: str) -> list[str]:
    """`body` split on `separator` where it is not inside a nested template or link."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        two = body[i : i + 2]
        if two in ("{{", "[["):
            depth += 1
            i += 2
        elif two in ("}}", "]]"):
            depth = max(0, depth - 1)
            i += 2
        elif body[i] == separator and depth == 0:
            parts.append(body[start:i])
            start = i = i + 1
        else:
            i += 1
    parts.append(body[start:])
    return parts
