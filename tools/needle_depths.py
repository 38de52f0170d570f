"""Which needles each configuration finds, by where they sit in the context: recency against scoring.

A task row's score (``tasks.jsonl``) is the fraction of its reference answers found in the answer; this tool splits
it per reference, by the reference's relative position in the context (its first occurrence, in characters), so a
method that keeps the newest tokens (StreamingLLM) and one that ranks by attention can be told apart: the first
finds the needles near the end of the prompt and nothing before, the second wherever its scores point.

    keepkv eval export-tasks SmolLM2-135M-Instruct --tasks niah_single,multivalue,multiquery,vt --lengths 2048 \\
        --samples 5 --out /tmp/export.jsonl                # the samples the store's rows ran (seed 0)
    python tools/needle_depths.py --results results/tasks --export /tmp/export.jsonl \\
        --model SmolLM2-135M-Instruct --budget 0.2 --edges 0.8 --label full --label keepkv:minnorm --label streamingllm

``--label``: configurations as ``keepkv eval report`` labels them (``full`` has budget 1 and is taken at any
budget). Families scored by string match only (QA families are skipped). A markdown table on stdout: found / needles
per protocol and depth bucket (``[0, e1)``, ``[e1, e2)``, ... ``[ek, 1]``).
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

from keepkv.eval.prompted import protocol_of
from keepkv.eval.report import label
from keepkv.eval.results import read_rows
from keepkv.eval.tasks import scoring_of, string_match_all


def needle_depths(record: dict) -> list[tuple[str, float]]:
    """``(reference, first position in the context / its length)`` of each reference found in the context."""
    context = record["context"]
    return [(ref, context.find(ref) / len(context)) for ref in record["answers"] if context.find(ref) >= 0]


def found_by_depth(rows, records: dict[str, dict], model: str, budget: float, labels: list[str],
                   edges: list[float], source: str) -> dict[tuple[str, str, int], list[int]]:
    """``(protocol, label, bucket) -> [found, needles]`` over the newest row of each (label, protocol, cell) of
    ``source`` (the rows' ``seed<S>-<haystack>``: cell names do not say which haystack built them)."""
    newest: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        if row.get("task") != "tasks" or row.get("model") != model or row.get("cell") not in records:
            continue
        if row.get("engine", "keepkv") != "keepkv" or row.get("source") != source or "answer" not in row:
            continue
        if row.get("scoring") != "match":
            continue
        name = label(row)
        if name not in labels or (name != "full" and float(row["budget"]) != budget):
            continue
        newest[(name, protocol_of(row), row["cell"])] = row
    counts: dict[tuple[str, str, int], list[int]] = {}
    for (name, protocol, cell), row in newest.items():
        for reference, depth in needle_depths(records[cell]):
            slot = counts.setdefault((protocol, name, bisect.bisect_right(edges, depth)), [0, 0])
            slot[0] += int(string_match_all(row["answer"], [reference]) == 1.0)
            slot[1] += 1
    return counts


def table(counts, labels: list[str], edges: list[float]) -> str:
    bounds = [0.0, *edges, 1.0]
    buckets = [f"[{bounds[i]:g}, {bounds[i + 1]:g}{']' if i == len(edges) else ')'}" for i in range(len(edges) + 1)]
    protocols = sorted({protocol for protocol, _, _ in counts})
    head = [f"{protocol} {bucket}" for protocol in protocols for bucket in buckets]
    lines = ["| configuration | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name in labels:
        cells = []
        for protocol in protocols:
            for i in range(len(buckets)):
                found, total = counts.get((protocol, name, i), [0, 0])
                cells.append(f"{found}/{total}" if total else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a task store (its tasks.jsonl rows)")
    parser.add_argument("--export", type=Path, required=True, help="keepkv eval export-tasks output of those samples")
    parser.add_argument("--model", required=True)
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--label", action="append", required=True, help="repeatable")
    parser.add_argument("--edges", default="0.8", help="comma-separated depth bucket edges in (0, 1)")
    parser.add_argument("--source", default="seed0-essays", help="the rows' source (seed and haystack of the export)")
    args = parser.parse_args(argv)
    edges = sorted(float(e) for e in args.edges.split(","))
    if not all(0.0 < e < 1.0 for e in edges):
        parser.error(f"--edges must lie in (0, 1), got {args.edges}")
    records = {}
    for line in args.export.read_text().splitlines():
        record = json.loads(line)
        if scoring_of(record["task"]) == "match":
            records[record["cell"]] = record
    counts = found_by_depth(read_rows(args.results), records, args.model, args.budget, args.label, edges, args.source)
    print(table(counts, args.label, edges))


if __name__ == "__main__":
    main()
