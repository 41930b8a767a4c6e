"""Real text for the corpus tests and benchmarks: a planted multilingual set (chatterbot-corpus, a PyPI
package of conversations in 28 languages, beside English WikiText-2 articles)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# chatterbot-corpus folder name -> ISO 639-1 code ("hinglish" is Hindi written in Latin letters).
CHATTERBOT_LANGUAGES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
    "hebrew": "he", "hindi": "hi", "hinglish": "hi", "indonesian": "id", "italian": "it",
    "japanese": "ja", "korean": "ko", "marathi": "mr", "persian": "fa", "portuguese": "pt",
    "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta", "telugu": "te", "thai": "th",
    "traditionalchinese": "zh", "turkish": "tr", "ukrainian": "uk", "urdu": "ur", "yoruba": "yo",
}  # fmt: skip


def chatterbot_folder() -> Optional[Path]:
    """The data folder of the installed chatterbot-corpus package, or None when it is not installed."""
    try:
        import chatterbot_corpus
        import yaml  # noqa: F401 - needed to read it
    except ImportError:
        return None
    return Path(os.path.dirname(chatterbot_corpus.__file__)) / "data"


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    return []


def multilingual_documents(folder: Path, chars: int = 300) -> list[tuple[str, str]]:
    """(language code, text) pairs: each conversation file's lines joined and cut into ~`chars` pieces."""
    import yaml

    docs = []
    for name, code in sorted(CHATTERBOT_LANGUAGES.items()):
        for path in sorted((folder / name).glob("*.yml")):
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f) or {}
            lines = _strings(content.get("conversations", []))
            piece = ""
            for line in lines:
                piece = f"{piece} {line.strip()}".strip()
                if len(piece) >= chars:
                    docs.append((code, piece))
                    piece = ""
    return docs
