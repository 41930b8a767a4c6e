"""Turn plain-text files into JSONL documents ({"text": ...} per line) for tools/preprocess_data.py.

    python tools/text_to_jsonl.py --input plays/*.txt --output corpus.jsonl --paragraphs-per-doc 20

Paragraphs are separated by blank lines; every `--paragraphs-per-doc` consecutive paragraphs of a file
form one document (a file never shares a document with another). Written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="Plain-text files (UTF-8).")
    parser.add_argument("--output", required=True, help="JSONL file to write.")
    parser.add_argument("--paragraphs-per-doc", type=int, default=20)
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    if args.paragraphs_per_doc < 1:
        parser.error("--paragraphs-per-doc must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".jsonl")
    docs = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for path in args.input:
                try:
                    with open(path, encoding="utf-8") as f:
                        paras = paragraphs(f.read())
                except (OSError, UnicodeDecodeError) as e:
                    raise SystemExit(f"error: cannot read {path}: {e}") from None
                step = args.paragraphs_per_doc
                for i in range(0, len(paras), step):
                    out.write(json.dumps({args.json_key: "\n\n".join(paras[i : i + step])}) + "\n")
                    docs += 1
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {docs} documents from {len(args.input)} files to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
