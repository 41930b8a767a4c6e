"""The merge stage: duplicates across all shards, then the output in input order and the report.

Memory: per document 24 bytes of metadata plus its signature (4 * num_perm bytes), for all documents at
once (the LSH bands are sorted over the whole corpus); the text itself is streamed.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator

import numpy as np

from megatron.corpus.dedup import exact_clusters, fuzzy_clusters
from megatron.corpus.documents import STAGES, CorpusConfig
from megatron.corpus.io import CorpusError, atomic_output
from megatron.corpus.shard import META_DTYPE, describe, is_done, shard_path

CLUSTER_EXAMPLES = 10
MEMBERS_SHOWN = 3
PREVIEW_CHARS = 160


def load_shards(
    config: CorpusConfig, folder: str, count: int
) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
    """(metadata per shard, all signatures, the shard reports); CorpusError if a shard is missing."""
    missing = [i for i in range(count) if not is_done(folder, i, count, config)]
    if missing:
        raise CorpusError(
            f"--merge: shards {missing} of {count} have not finished in {folder} (no .done marker); run them first"
        )
    metas, signatures, reports = [], [], []
    width = config.minhash.num_perm if config.dedup else 0
    for i in range(count):
        metas.append(np.fromfile(shard_path(folder, i, count, "meta"), dtype=META_DTYPE))
        values = np.fromfile(shard_path(folder, i, count, "sig"), dtype=np.uint32)
        signatures.append(values.reshape(len(metas[-1]), width))
        with open(shard_path(folder, i, count, "json")) as file:
            reports.append(json.load(file))
    return metas, np.concatenate(signatures), reports


def _stage_entry(docs_in: int, bytes_in: int, docs_out: int, bytes_out: int) -> dict:
    return {"docs_in": docs_in, "bytes_in": bytes_in, "docs_out": docs_out, "bytes_out": bytes_out}


def find_duplicates(config: CorpusConfig, meta: np.ndarray, signatures: np.ndarray) -> dict[str, np.ndarray]:
    """{'exact': first-of-cluster index per document, 'fuzzy': the same after exact dedup}."""
    roots = {"exact": np.arange(len(meta)), "fuzzy": np.arange(len(meta))}
    if config.dedup and len(meta):
        roots["exact"] = exact_clusters(meta["exact"])
        unique = np.flatnonzero(roots["exact"] == np.arange(len(meta)))
        roots["fuzzy"] = fuzzy_clusters(signatures, unique, config.minhash)
    return roots


def _clusters(roots: np.ndarray) -> list[np.ndarray]:
    members = np.flatnonzero(roots != np.arange(len(roots)))
    groups: dict[int, list[int]] = {}
    for i in members:
        groups.setdefault(int(roots[i]), [int(roots[i])]).append(int(i))
    return [np.array(groups[k]) for k in sorted(groups)]


def _shard_lines(folder: str, index: int, count: int, ordinals: np.ndarray) -> Iterator[tuple[int, bytes]]:
    with open(shard_path(folder, index, count, "jsonl"), "rb") as file:
        for ordinal, line in zip(ordinals, file):
            yield int(ordinal), line


def write_output(
    config: CorpusConfig, folder: str, metas: list[np.ndarray], kept: set[int], wanted: set[int], output: str
) -> dict[int, str]:
    """Write the documents whose ordinal is in `kept`, in ordinal order; return previews of those in `wanted`."""
    previews: dict[int, str] = {}
    streams = [_shard_lines(folder, i, len(metas), m["ordinal"]) for i, m in enumerate(metas)]
    with atomic_output(output) as out:
        for ordinal, line in heapq.merge(*streams):
            if ordinal in wanted:
                record = json.loads(line)
                previews[ordinal] = "\n\n".join(record[k] for k in config.json_keys)[:PREVIEW_CHARS]
            if ordinal in kept:
                out.write(line)
    return previews


def merge(config: CorpusConfig, folder: str, count: int, output: str, report_path: str) -> dict:
    """Dedup across the shards in `folder`, write `output` and the report; return the report."""
    metas, signatures, reports = load_shards(config, folder, count)
    meta = np.concatenate(metas)
    order = np.argsort(meta["ordinal"], kind="stable")
    meta, signatures = meta[order], signatures[order] if len(signatures) else signatures
    roots = find_duplicates(config, meta, signatures)
    exact_keep = roots["exact"] == np.arange(len(meta))
    keep = exact_keep & (roots["fuzzy"] == np.arange(len(meta)))
    clusters = {name: _clusters(r) for name, r in roots.items()}
    shown = {name: c[:CLUSTER_EXAMPLES] for name, c in clusters.items()}
    wanted = {int(meta["ordinal"][i]) for c in shown.values() for g in c for i in g[: MEMBERS_SHOWN + 1]}
    previews = write_output(config, folder, metas, set(meta["ordinal"][keep].tolist()), wanted, output)

    stages = {}
    for stage in STAGES:
        totals = np.sum([r["stages"][stage] for r in reports], axis=0).tolist()
        stages[stage] = _stage_entry(*totals)
    sizes = meta["bytes"]
    stages["exact_dedup"] = _stage_entry(
        len(meta), int(sizes.sum()), int(exact_keep.sum()), int(sizes[exact_keep].sum())
    )
    stages["fuzzy_dedup"] = _stage_entry(
        int(exact_keep.sum()), int(sizes[exact_keep].sum()), int(keep.sum()), int(sizes[keep].sum())
    )

    def example(group: np.ndarray) -> dict:
        docs = [{"source": describe(config, int(meta["ordinal"][i])), "preview": previews.get(int(meta["ordinal"][i]), "")}
                for i in group[: MEMBERS_SHOWN + 1]]  # fmt: skip
        return {"size": len(group), "kept": docs[0], "removed": docs[1:]}

    report = {
        "inputs": list(config.inputs),
        "output": output,
        "shards": count,
        "fingerprint": config.fingerprint(),
        "stages": stages,
        "dropped": {s: _sum_counters(r["dropped"][s] for r in reports) for s in STAGES},
        "boilerplate": {
            "docs": sum(r["boilerplate_docs"] for r in reports),
            "chars": sum(r["boilerplate_chars"] for r in reports),
        },  # fmt: skip
        "decontamination": {
            "docs": sum(r["decontaminated_docs"] for r in reports),
            "removed_chars": sum(r["decontaminated_chars"] for r in reports),
            "examples": _first_examples([e for r in reports for e in r["decontaminated"]]),
        },
        "duplicates": {
            name: {
                "clusters": len(c),
                "removed_docs": int(sum(len(g) - 1 for g in c)),
                "examples": [example(g) for g in shown[name]],
            }
            for name, c in clusters.items()
        },  # fmt: skip
    }
    with atomic_output(report_path, "w") as file:
        json.dump(report, file, indent=1, ensure_ascii=False)
    return report


def _first_examples(examples: list[dict], limit: int = 20) -> list[dict]:
    """The first `limit` examples in input order (each shard keeps its first ones), without the sort key."""
    ordered = sorted(examples, key=lambda e: e["order"])[:limit]
    return [{k: v for k, v in e.items() if k != "order"} for e in ordered]


def _sum_counters(counters) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def summary(report: dict) -> str:
    """A few lines for the terminal: documents and MB in/out per stage, duplicates, decontamination."""
    lines = [f"{'stage':<14}{'docs in':>10}{'docs out':>10}{'MB in':>10}{'MB out':>10}"]
    for stage, s in report["stages"].items():
        lines.append(
            f"{stage:<14}{s['docs_in']:>10}{s['docs_out']:>10}{s['bytes_in'] / 1e6:>10.2f}{s['bytes_out'] / 1e6:>10.2f}"
        )
    for name, d in report["duplicates"].items():
        lines.append(f"{name} duplicates: {d['clusters']} clusters, {d['removed_docs']} documents removed")
    b, c = report["boilerplate"], report["decontamination"]
    lines.append(f"boilerplate: {b['docs']} documents, {b['chars']} characters removed")
    lines.append(f"decontamination: {c['docs']} documents matched, {c['removed_chars']} characters removed")
    return "\n".join(lines)
