"""Paired comparison of task configurations against one baseline configuration, per model and budget.

Usage::

    python tools/compare_configs.py --results results/tasks_selection --baseline keepkv:minnorm \
        [--protocol aware] [--out results/tasks_selection/PAIRED.md]

For every configuration (labelled as ``keepkv eval report`` labels rows: options that differ from today's
defaults) and every budget, on the (family, sample) cells both it and the baseline answered: the mean over task
families of the per-family mean difference, its 95% percentile-bootstrap interval (resampling samples within
each family, :func:`keepkv.eval.bootstrap.stratified_interval`), the paired cell count and each family's mean
difference. A markdown table on stdout (and in ``--out``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from keepkv.eval.bootstrap import stratified_interval
from keepkv.eval.prompted import metric_name
from keepkv.eval.report import label


def load_cells(path: Path, protocol: str) -> dict[tuple[str, str, float], dict[tuple[str, int], float]]:
    """``{(model, label, budget): {(family, sample): value}}``: the ``task_accuracy`` rows of ``protocol`` (string
    match; SQuAD F1 for the QA families, as in ``REPORT.md``)."""
    cells: dict[tuple[str, str, float], dict[tuple[str, int], float]] = defaultdict(dict)
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("task") == "tasks" and row["metric"] == metric_name("task_accuracy", protocol):
                cells[(row["model"], label(row), row["budget"])][(row["family"], row["sample"])] = row["value"]
    return cells


def family_mean(values: dict[str, list[float]]) -> float:
    """The mean over families of each family's mean."""
    return sum(sum(v) / len(v) for v in values.values()) / len(values)


def table(cells: dict, baseline: str) -> list[str]:
    lines = ["| model | budget | configuration | mean over families | vs baseline [95%] | paired cells | per family |",
             "|---|---:|---|---:|---|---:|---|"]
    for (model, name, budget), answers in sorted(cells.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        by_family: dict[str, list[float]] = defaultdict(list)
        for (family, _), value in answers.items():
            by_family[family].append(value)
        mean = family_mean(by_family)
        base = cells.get((model, baseline, budget))
        if name == baseline or not base:
            role = "(baseline)" if name == baseline else "(no baseline at this budget)"
            lines.append(f"| {model} | {budget:g} | {name} | {mean:.3f} | {role} | {len(answers)} | |")
            continue
        differences: dict[str, list[float]] = defaultdict(list)
        for cell, value in answers.items():
            if cell in base:
                differences[cell[0]].append(value - base[cell])
        if not differences:
            continue
        low, high = stratified_interval(dict(differences), family_mean)
        per_family = ", ".join(f"{family} {sum(v) / len(v):+.2f}" for family, v in sorted(differences.items()))
        paired = sum(len(v) for v in differences.values())
        lines.append(f"| {model} | {budget:g} | {name} | {mean:.3f} | {family_mean(differences):+.3f} "
                     f"[{low:+.3f}, {high:+.3f}] | {paired} | {per_family} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="results directory holding tasks.jsonl")
    parser.add_argument("--baseline", required=True, help="the label of the baseline configuration")
    parser.add_argument("--protocol", default="aware", help="aware, agnostic or chunked (default: aware)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    lines = table(load_cells(args.results / "tasks.jsonl", args.protocol), args.baseline)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
