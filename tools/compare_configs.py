"""Paired comparison of configurations against one baseline configuration, per model and budget.

Usage::

    python tools/compare_configs.py --results results/tasks_selection --baseline keepkv:minnorm \
        [--protocol aware] [--out results/tasks_selection/PAIRED.md]
    python tools/compare_configs.py --results results/quality --baseline keepkv:minnorm --metric kl \
        [--out results/quality/PAIRED_kl.md]

For every configuration (labelled as ``keepkv eval report`` labels rows: options that differ from today's
defaults) and every budget, on the (family, sample) cells both it and the baseline answered: the mean over task
families of the per-family mean difference and its 95% stratified bootstrap interval, the paired cell count and
each family's mean difference. With ``--metric kl`` the cells are the fidelity passages of ``fidelity.jsonl``
(next-token KL to the full cache, lower is better; one "family"), so the difference is the paired mean over
passages. The cells, the pairing and the interval are :mod:`keepkv.eval.targets`' own
(:func:`~keepkv.eval.targets.cells_by_config`, :func:`~keepkv.eval.targets.paired`,
:func:`~keepkv.eval.targets.difference`), computed as ``REPORT.md``'s targets compute theirs; the targets print
*KeepKV - method*, this table *configuration - baseline*, so signs flip and a bound may differ in the last digit
(the percentile interval is not symmetric under negation).
A markdown table on stdout (and in ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from keepkv.eval.targets import Cells, cells_by_config, difference, kl_cells_by_config, paired


def load_cells(path: Path, protocol: str) -> dict[tuple[str, str, float], Cells]:
    """``{(model, label, budget): {family: {cell: value}}}``: the ``task_accuracy`` rows of ``protocol`` (string
    match; SQuAD F1 for the QA families, as in ``REPORT.md``), the latest row per cell."""
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {(model, name, budget): cells
            for (model, row_protocol, name, budget), cells in cells_by_config(rows).items()
            if row_protocol == protocol}


def load_kl_cells(path: Path) -> dict[tuple[str, str, float], Cells]:
    """``{(model, label, budget): {"fidelity": {passage: KL}}}``: the ``kl`` rows of a fidelity store
    (:func:`~keepkv.eval.targets.kl_cells_by_config`)."""
    with path.open(encoding="utf-8") as handle:
        return kl_cells_by_config([json.loads(line) for line in handle if line.strip()])


def family_mean(cells: Cells) -> float:
    """The mean over families of each family's mean."""
    return mean(mean(values.values()) for values in cells.values())


def table(cells: dict[tuple[str, str, float], Cells], baseline: str) -> list[str]:
    lines = ["| model | budget | configuration | mean over families | vs baseline [95%] | paired cells | per family |",
             "|---|---:|---|---:|---|---:|---|"]
    for (model, name, budget), answers in sorted(cells.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        own = f"{family_mean(answers):.3f}"
        count = sum(len(values) for values in answers.values())
        base = cells.get((model, baseline, budget))
        if name == baseline or not base:
            role = "(baseline)" if name == baseline else "(no baseline at this budget)"
            lines.append(f"| {model} | {budget:g} | {name} | {own} | {role} | {count} | |")
            continue
        pairs = paired(answers, base)
        if not pairs:
            continue
        value, low, high = difference(pairs)
        per_family = ", ".join(f"{family} {mean(a - b for a, b in v):+.2f}" for family, v in pairs.items())
        lines.append(f"| {model} | {budget:g} | {name} | {own} | {value:+.3f} [{low:+.3f}, {high:+.3f}] | "
                     f"{sum(len(v) for v in pairs.values())} | {per_family} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True,
                        help="results directory holding tasks.jsonl (fidelity.jsonl for --metric kl)")
    parser.add_argument("--baseline", required=True, help="the label of the baseline configuration")
    parser.add_argument("--protocol", default="aware", help="aware, agnostic or chunked (default: aware)")
    parser.add_argument("--metric", default="task_accuracy", choices=("task_accuracy", "kl"),
                        help="task_accuracy (tasks.jsonl, default) or kl (fidelity.jsonl: next-token KL, lower is "
                             "better; --protocol is ignored)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.metric == "kl":
        cells = load_kl_cells(args.results / "fidelity.jsonl")
    else:
        cells = load_cells(args.results / "tasks.jsonl", args.protocol)
    lines = table(cells, args.baseline)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
