"""The README's headline tables: named configurations against one baseline, each cell paired on shared samples.

Usage::

    python tools/headline_tables.py --results results/tasks_selection --model Qwen2.5-Coder-0.5B-Instruct \\
        --columns aware:0.2,aware:0.5,agnostic:0.2,agnostic:0.5 \\
        --row "KeepKV (default)" keepkv:minnorm --row CriticalKV criticalkv ...
    python tools/headline_tables.py --results results/quality --metric kl --model SmolLM2-135M-Instruct \\
        --columns 0.1,0.2 --row "KeepKV (default)" keepkv:minnorm --row SnapKV snapkv ...

A row is a display name and a label (labels as ``keepkv eval report`` prints them: the options that differ from
today's defaults); the first row is the baseline unless ``--baseline`` names another label. A column is
``protocol:budget`` for task accuracy (``task_accuracy`` rows of ``tasks.jsonl``: mean over task families, string
match, SQuAD F1 for the QA families) or ``budget`` for ``--metric kl`` (``fidelity.jsonl``: mean next-token KL over
passages). Each cell is the configuration's mean **on the samples it shares with the baseline** (so a configuration
run on more samples than the baseline stays comparable; the baseline's own cell is its mean over all its samples,
so a row that ran on fewer samples is compared on its own subset: read its bracket) and, in brackets, the paired
difference *row - baseline* with its 95% stratified bootstrap interval (:mod:`keepkv.eval.targets`:
:func:`~keepkv.eval.targets.paired`, :func:`~keepkv.eval.targets.difference`).

Bold marks each column's best configuration **by the paired difference** (the baseline's is 0; highest for accuracy,
lowest for KL; full caches excluded; ties at the printed digits all bold), not by the printed means: those are taken
on different samples when rows ran on different subsets, and a row's higher mean on an easier subset must not outrank
the baseline it trails on those same samples. A row that shares only some of the baseline's task families is printed
but never bold. ``–``: not run, no baseline in that column, or no sample shared with it. A markdown table on stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from compare_configs import family_mean, load_cells, load_kl_cells  # one reader of the stores: compare_configs'

from keepkv.eval.prompted import PROTOCOLS
from keepkv.eval.report import is_full
from keepkv.eval.targets import Cells, difference, paired


def load(results: Path, metric: str) -> dict[tuple, Cells]:
    """``(model, protocol, label, budget) -> Cells`` (protocol ``""`` for KL)."""
    if metric == "kl":
        return {(model, "", lab, budget): cells
                for (model, lab, budget), cells in load_kl_cells(results / "fidelity.jsonl").items()}
    return {(model, protocol, lab, budget): cells for protocol in PROTOCOLS
            for (model, lab, budget), cells in load_cells(results / "tasks.jsonl", protocol).items()}


def parse_column(text: str, metric: str) -> tuple[str, float]:
    if metric == "kl":
        return "", float(text)
    protocol, _, budget = text.partition(":")
    if not budget:
        raise SystemExit(f"column {text!r}: write protocol:budget (e.g. aware:0.2)")
    return protocol, float(budget)


def table(data: dict[tuple, Cells], model: str, rows: list[tuple[str, str]], baseline: str,
          columns: list[tuple[str, float]], metric: str) -> list[str]:
    digits = 3 if metric == "kl" else 2
    cells: dict[tuple[int, int], tuple[float, str]] = {}  # (row, column) -> (paired difference to the baseline, text)
    partial: set[tuple[int, int]] = set()  # rows sharing only some of the baseline's families: never bold
    for c, (protocol, budget) in enumerate(columns):
        base = data.get((model, protocol, baseline, budget))
        for r, (_, lab) in enumerate(rows):
            own = data.get((model, protocol, lab, budget))
            if not own or not base:
                continue
            if lab == baseline:
                value = family_mean(own)
                cells[r, c] = (0.0, f"{value:.{digits}f}")
                continue
            pairs = paired(own, base)
            if not pairs:
                continue
            value = mean(mean(a for a, _ in v) for v in pairs.values())
            diff, low, high = difference(pairs)
            if set(pairs) != set(base):
                partial.add((r, c))
            cells[r, c] = (diff, f"{value:.{digits}f} ({diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}])")
    for c in range(len(columns)):
        ranked = [(diff, r) for (r, cc), (diff, _) in cells.items()
                  if cc == c and not is_full(rows[r][1]) and (r, c) not in partial]
        if ranked:
            best = (min if metric == "kl" else max)(diff for diff, _ in ranked)
            for diff, r in ranked:
                if round(diff, digits) == round(best, digits):
                    text = cells[r, c][1]
                    head, _, rest = text.partition(" ")
                    cells[r, c] = (diff, f"**{head}**" + (f" {rest}" if rest else ""))
    header = ["method", *[(f"{p} " if p else "") + (f"KL {b:.0%}" if metric == "kl" else f"{b:.0%}")
                          for p, b in columns]]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r, (name, _) in enumerate(rows):
        lines.append("| " + " | ".join([name, *[cells.get((r, c), (0.0, "–"))[1] for c in range(len(columns))]])
                     + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="results directory (tasks.jsonl or fidelity.jsonl)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--metric", default="task_accuracy", choices=("task_accuracy", "kl"))
    parser.add_argument("--columns", required=True, help="comma-separated protocol:budget (or budget for kl)")
    parser.add_argument("--row", action="append", required=True, nargs=2, metavar=("NAME", "LABEL"),
                        help="a display name and a configuration's label; repeatable, in table order")
    parser.add_argument("--baseline", help="the baseline's label (default: the first row's)")
    args = parser.parse_args()
    rows = [(name, lab) for name, lab in args.row]
    columns = [parse_column(text, args.metric) for text in args.columns.split(",")]
    print("\n".join(table(load(args.results, args.metric), args.model, rows, args.baseline or rows[0][1], columns,
                          args.metric)))


if __name__ == "__main__":
    main()
