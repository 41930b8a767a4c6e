"""Undo WikiText's tokenization before a GPT tokenizer sees the text (the rules Megatron-LM applies).

WikiText's `.tokens` files put spaces around every punctuation mark and write number separators as
" @-@ ", " @,@ ", " @.@ ". A model trained on ordinary text is scored on ordinary text, so the file is
detokenized first. The rules, applied in this order to the whole file:

    contractions       "s '" -> "s'"
    number separators  " @-@ " -> "-"    " @,@ " -> ","    " @.@ " -> "."
    punctuation        " : " -> ": "     " ; " -> "; "     " . " -> ". "
                       " ! " -> "! "     " ? " -> "? "     " , " -> ", "
    brackets, quotes   "( x )" -> "(x)", likewise [ ], { }, " " and ' ' (non-greedy, innermost first)
    headings           "= = = =" -> "===="   "= = =" -> "==="   "= =" -> "=="
    miscellaneous      " ° " -> "°"      " \\n" -> "\\n"   "\\n " -> "\\n"   " N " -> " 1 "   " 's" -> "'s"

(Megatron's list also has a pattern for "/' [0-9]/" with literal slashes, which does not occur in
WikiText; it is left out.)
"""

from __future__ import annotations

import re


def _literal(old: str, new: str) -> tuple[re.Pattern[str], str]:
    return re.compile(re.escape(old)), new.replace("\\", "\\\\")


def _between(open_char: str, close_char: str) -> tuple[re.Pattern[str], str]:
    """`open x close` with spaces inside the delimiters removed: "( a b )" -> "(a b)"."""
    o, c = re.escape(open_char), re.escape(close_char)
    return re.compile(rf"{o}\s*([^{c}]*?)\s*{c}"), rf"{open_char}\1{close_char}"


_RULES: list[tuple[re.Pattern[str], str]] = [
    _literal("s '", "s'"),
    _literal(" @-@ ", "-"),
    _literal(" @,@ ", ","),
    _literal(" @.@ ", "."),
    _literal(" : ", ": "),
    _literal(" ; ", "; "),
    _literal(" . ", ". "),
    _literal(" ! ", "! "),
    _literal(" ? ", "? "),
    _literal(" , ", ", "),
    _between("(", ")"),
    _between("[", "]"),
    _between("{", "}"),
    _between('"', '"'),
    _between("'", "'"),
    _literal("= = = =", "===="),
    _literal("= = =", "==="),
    _literal("= =", "=="),
    _literal(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    _literal(" \n", "\n"),
    _literal("\n ", "\n"),
    _literal(" N ", " 1 "),
    _literal(" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """Apply the rules of the module docstring, in order, to `text`."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text
