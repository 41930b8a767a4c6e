"""Unicode repair (ftfy) and removal of known boilerplate (Project Gutenberg headers and licence)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron.corpus.io import require

# Project Gutenberg wraps every e-text between a start and an end line; their spelling changed over the
# years ("THIS"/"THE", "EBOOK"/"E-BOOK"/"ETEXT", with or without the spaces inside the asterisks, and
# the older "End of (the) Project Gutenberg('s) EBook of ..." closing line). Everything before the start
# line is the header (title page, terms of use) and everything from the end line on is the licence.
GUTENBERG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b[^\n]*$\n?",
    re.IGNORECASE | re.MULTILINE,
)
GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b"
    r"|End of (?:the )?Project Gutenberg(?:'s)? E-?(?:Book|text)\b)",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Cleaned:
    text: str
    boilerplate_chars: int  # characters of Gutenberg header/licence removed


def strip_gutenberg(text: str) -> tuple[str, int]:
    """`text` without what precedes a Gutenberg start line and what follows an end line (if present)."""
    start = GUTENBERG_START.search(text)
    begin = start.end() if start else 0
    end = GUTENBERG_END.search(text, begin)
    finish = end.start() if end else len(text)
    body = text[begin:finish]
    if start is None and end is None:
        return text, 0
    stripped = body.strip("\n")
    return stripped, len(text) - len(stripped)


class Cleaner:
    """ftfy's fix_text (mojibake, HTML entities, control characters, NFC), then boilerplate stripping."""

    def __init__(self, strip_boilerplate: bool = True) -> None:
        self._ftfy = require("ftfy", "ftfy")
        self.strip_boilerplate = strip_boilerplate

    def __call__(self, text: str) -> Cleaned:
        fixed = self._ftfy.fix_text(text, normalization="NFC")
        if not self.strip_boilerplate:
            return Cleaned(fixed, 0)
        body, removed = strip_gutenberg(fixed)
        return Cleaned(body, removed)
