"""kvpress's task rows beside keepkv's (runs in keepkv's venv): the same-model check and per-family scores.

Reads ``DIR/tasks.jsonl`` (``keepkv eval tasks`` rows and the peer rows ``score_kvpress.py --tasks-store``
appended) for one model and the cells of a ``task_prompts.py`` file (with ``keepkv_group``: only keepkv's rows of
that batch, the ones the peer's decode allowance matches) and prints, per protocol:

- **full vs full**: per cell, keepkv's uncompressed answer and score beside kvpress's; the count of cells with the
  same score and with the same answer text (whitespace-stripped). Both engines read the same token ids, so a
  difference is numerical (fp32 kernels, batching with left padding on keepkv's side) or a decoding difference;
- **per family**: kvpress's mean score per press and budget (string match / SQuAD F1, as stored), with keepkv's
  rows of the same method names beside them (their configurations differ: see ``results/tasks/RUN.md``).

Latest row wins per (engine, method, budget, cell, metric), as in keepkv's report::

    .venv/bin/python tools/peers/compare_tasks.py results/tasks/peers/prompts-SmolLM2-135M-Instruct-headline-2048.jsonl \\
        --model SmolLM2-135M-Instruct --results results/tasks
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

METRICS = {"task_accuracy": "agnostic", "task_accuracy_aware": "aware"}


def latest_rows(store: Path, model: str, cells: dict[str, str | None]) -> dict[tuple, dict]:
    """``(engine, protocol, label, budget, cell) -> row`` of the headline metric, last written wins
    (:func:`keepkv.eval.report.label` without the engine); keepkv rows only from the cell's batch when
    ``cells[cell]`` names one."""
    from keepkv.eval.report import label

    out = {}
    for line in store.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("task") != "tasks" or row.get("model") != model or row.get("metric") not in METRICS \
                or row.get("cell") not in cells:
            continue
        engine = row.get("engine", "keepkv")
        group = cells[row["cell"]]
        if engine == "keepkv" and group is not None:
            ran = json.loads(row["unit"])[5]  # the batch, "/<protocol>" appended for aware and chunked
            if ran != group and not ran.startswith(group + "/"):
                continue
        method = label(row).removesuffix(f" [{engine}]")
        out[(engine, METRICS[row["metric"]], method, float(row["budget"]), row["cell"])] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", help="prompts-*.jsonl of task_prompts.py (the cells)")
    p.add_argument("--model", required=True)
    p.add_argument("--results", default="results/tasks")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    cells = {r["cell"]: r.get("keepkv_group") for r in records}
    family = {r["cell"]: r["task"] for r in records}
    rows = latest_rows(Path(args.results) / "tasks.jsonl", args.model, cells)
    for protocol in ("aware", "agnostic"):
        print(f"\n## {args.model}, {protocol}: full (keepkv) vs full (kvpress)")
        same_score = same_text = both = 0
        for cell in cells:
            ours, theirs = rows.get(("keepkv", protocol, "full", 1.0, cell)), rows.get(("kvpress", protocol, "full", 1.0, cell))
            if not ours or not theirs:
                print(f"{cell:26s} missing: keepkv {bool(ours)} kvpress {bool(theirs)}")
                continue
            both += 1
            same_score += abs(ours["value"] - theirs["value"]) < 1e-9
            same_text += ours["answer"].strip() == theirs["answer"].strip()
            flag = "" if abs(ours["value"] - theirs["value"]) < 1e-9 else "  <- differs"
            print(f"{cell:26s} keepkv {ours['value']:.2f} {ours['answer'].strip()[:40]!r:44s} "
                  f"kvpress {theirs['value']:.2f} {theirs['answer'].strip()[:40]!r}{flag}")
        print(f"same score {same_score}/{both}, same answer text {same_text}/{both}")
        print(f"\n## {args.model}, {protocol}: mean score per family (n samples each)")
        methods = sorted({(e, m) for e, pr, m, b, c in rows if pr == protocol and b < 1.0})
        families = list(dict.fromkeys(family.values()))
        print(f"{'method':34s} {'budget':>6s} " + " ".join(f"{f[:10]:>10s}" for f in families) + f" {'mean':>6s}")
        for engine, method in sorted(methods, key=lambda em: (em[0] != "kvpress", em[1])):
            for budget in (0.1, 0.2, 0.5):
                by_family = defaultdict(list)
                for cell in cells:
                    row = rows.get((engine, protocol, method, budget, cell))
                    if row:
                        by_family[family[cell]].append(row["value"])
                if not by_family:
                    continue
                values = [mean(by_family[f]) if f in by_family else float("nan") for f in families]
                label = f"{method} [{engine}]"
                print(f"{label:34s} {budget:6.2f} " + " ".join(f"{v:10.2f}" for v in values)
                      + f" {mean(mean(v) for v in by_family.values()):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
