"""Concatenate every indexed dataset (`.bin`/`.idx` pair) in a folder into one, as Megatron-LM's tool does.

    python tools/merge_datasets.py --input data/shards --output-prefix data/merged_text_document

The datasets are taken in sorted order of their prefixes. The result holds their sequences and documents
one after the other: `.bin` is the concatenation of the `.bin` files, sequence lengths are concatenated and
each dataset's document boundaries are shifted by the number of sequences before it. All inputs must
share one dtype. Output is written under temporary names and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from megatron.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="Folder holding the .bin/.idx pairs to merge.")
    parser.add_argument(
        "--output-prefix", required=True, help="Path of the merged dataset without the suffix."
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input: no such directory: {args.input}")
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(output_dir):
        parser.error(f"--output-prefix: directory {output_dir} does not exist")
    return args


def find_datasets(folder: str) -> list[str]:
    """Sorted prefixes of the datasets in `folder`; SystemExit if a `.bin` lacks its `.idx` or vice versa."""
    prefixes: dict[str, set[str]] = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(folder, name)):
            prefixes.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(prefixes.items()):
        if exts != {".bin", ".idx"}:
            (present,) = exts
            missing = ".idx" if present == ".bin" else ".bin"
            raise SystemExit(f"error: {os.path.join(folder, stem + present)} has no matching {missing} file")
    if not prefixes:
        raise SystemExit(f"error: --input {folder} holds no .bin/.idx datasets")
    return [os.path.join(folder, stem) for stem in sorted(prefixes)]


def merge(inputs: list[str], output_prefix: str) -> None:
    """Write the concatenation of the datasets `inputs` (in this order) to `output_prefix`."""
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in inputs}:
        raise SystemExit(f"error: --output-prefix {output_prefix} would overwrite one of the inputs")
    try:
        dtype = IndexedDataset(inputs[0]).dtype
        with IndexedDatasetBuilder(data_file_path(output_prefix), dtype=dtype) as builder:
            for prefix in inputs:
                builder.add_index(prefix)
            builder.finalize(index_file_path(output_prefix))
    except (OSError, ValueError) as error:  # unreadable or corrupt inputs, mixed dtypes
        raise SystemExit(f"error: {error}") from None


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    inputs = find_datasets(args.input)
    merge(inputs, args.output_prefix)
    print(
        f"merged {len(inputs)} datasets into {data_file_path(args.output_prefix)}, {index_file_path(args.output_prefix)}"
    )


if __name__ == "__main__":
    main()
