"""Score kvpress's raw answers with keepkv's own scorers (runs in keepkv's venv, NOT in the kvpress venv).

``tools/peers/kvpress_eval.py eval`` writes one raw line per cell x press x budget (the answer text, the reference
answers, what the cache kept). This script scores each answer with exactly the functions keepkv's eval uses —
:func:`keepkv.eval.niah.score_niah` (``niah_exact_match``: the needle's number appears in the answer) and
:func:`keepkv.eval.qa.score_qa` (``qa_f1`` / ``qa_exact_match``, SQuAD-normalised, on the answer's first
paragraph) — and writes one row per metric in keepkv's result-row shape (``keepkv/eval/results.py``):

    {"task", "metric", "value", "model", "method", "variant", "budget", "kept_entries_per_head", "cell", "seed",
     "engine": "kvpress", "keepkv_version" (of the scorer), "kvpress_version", "transformers_version",
     "torch_version", "answer", ...}

    .venv/bin/python tools/peers/score_kvpress.py results/eval/peers/kvpress-SmolLM2-135M-Instruct.answers.jsonl
        -> results/eval/peers/kvpress-SmolLM2-135M-Instruct.jsonl

RULER-style task answers (raw rows of a ``keepkv eval export-tasks`` file, ``task`` = a family of
:data:`keepkv.eval.tasks.FAMILIES`) are scored with :func:`keepkv.eval.tasks.score_task`, the scorer of keepkv's
own task rows, and with ``--tasks-store DIR`` APPENDED to ``DIR/tasks.jsonl`` in the shape of keepkv's task rows
(``task: "tasks"``, metric ``task_accuracy`` / ``task_accuracy_aware`` by ``protocol``, ``family``, ``sample``,
``source``, ``unit`` starting with ``"kvpress"`` so keepkv's resumable store never takes a peer row for its own);
rows already in the store (same engine, model, method, budget, cell, metric) are skipped, so reruns are safe::

    .venv/bin/python tools/peers/score_kvpress.py results/tasks/peers/kvpress-SmolLM2-135M-Instruct.answers.jsonl \
        --tasks-store results/tasks
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from keepkv import __version__ as keepkv_version
from keepkv.eval.niah import score_niah
from keepkv.eval.qa import score_qa

SCORERS = {"niah": score_niah, "qa": score_qa}
COPIED = ("task", "model", "method", "variant", "budget", "cell", "seed", "kvpress_version",
          "transformers_version", "torch_version", "dtype", "depth", "target_tokens", "context_tokens", "answer")


def score_rows(raw: list[dict]) -> list[dict]:
    """One keepkv-shaped row per (raw answer, metric)."""
    rows = []
    for item in raw:
        scorer = SCORERS.get(item["task"])
        if scorer is None:
            raise SystemExit(f"no scorer for task {item['task']!r}; known: {sorted(SCORERS)}")
        for metric, value in scorer(item["answer"], SimpleNamespace(answers=list(item["answers"]))).items():
            rows.append({**{k: item.get(k) for k in COPIED}, "metric": metric, "value": float(value),
                         "engine": "kvpress", "keepkv_version": keepkv_version,  # the version that scored it
                         "kept_entries_per_head": item.get("kept_entries_mean"),
                         "context_tokens_peer": item.get("context_tokens_peer")})
    return rows


TASK_COPIED = ("model", "method", "variant", "budget", "cell", "seed", "protocol", "kvpress_version",
               "transformers_version", "torch_version", "dtype", "target_tokens", "context_tokens", "answer",
               "ids_source", "kvpress_template_ids_equal", "shared_prefill", "compression_ratio", "max_new_tokens",
               "stop_token_ids", "keepkv_group")


def is_task_row(item: dict) -> bool:
    from keepkv.eval.tasks import FAMILIES

    return item["task"] in FAMILIES


def score_task_rows(raw: list[dict]) -> list[dict]:
    """keepkv-task-shaped rows (one per raw answer and metric) scored by :func:`keepkv.eval.tasks.score_task`."""
    from keepkv.eval.tasks import score_task, scoring_of

    rows = []
    for item in raw:
        family, protocol = item["task"], item.get("protocol", "agnostic")
        cell = SimpleNamespace(answers=[str(a) for a in item["answers"]], extra={"scoring": scoring_of(family)})
        source = f"seed{item.get('seed', 0)}-{item.get('haystack') or 'dataset'}"
        unit = json.dumps(["kvpress", "tasks", item["model"], item["method"], item["budget"],
                           f"{source}/{item['cell']}/{protocol}"])
        for metric, value in score_task(item["answer"], cell).items():
            rows.append({**{k: item.get(k) for k in TASK_COPIED}, "task": "tasks",
                         "metric": metric if protocol == "agnostic" else f"{metric}_aware", "value": float(value),
                         "engine": "kvpress", "keepkv_version": keepkv_version, "family": family,
                         "scoring": scoring_of(family), "source": source, "sample": item.get("sample"),
                         "kept_entries_per_head": item.get("kept_entries_mean"),
                         "prompt_tokens": item.get("context_tokens_peer"), "unit": unit})
    return rows


def append_new(rows: list[dict], store: Path) -> int:
    """Append the rows not yet in ``store`` (key: engine, model, method, budget, cell, metric and the decode
    allowance ``max_new_tokens``: a rerun with keepkv's larger batch allowance is a new row, and the report takes
    the latest) in ONE ``write`` call on a file opened with ``O_APPEND`` (keepkv's ``ResultStore`` appends its
    units the same way, so the two writers' lines cannot interleave within a line); returns how many were written."""
    import os

    key = lambda r: (r.get("engine", "keepkv"), r["model"], r["method"], float(r["budget"]), r["cell"], r["metric"],
                     r.get("max_new_tokens"))
    seen = set()
    if store.exists():
        for line in store.read_text().splitlines():
            try:
                seen.add(key(json.loads(line)))
            except (json.JSONDecodeError, KeyError):
                continue
    new = [r for r in rows if key(r) not in seen]
    if new:
        data = "".join(json.dumps(r) + "\n" for r in new).encode()
        fd = os.open(store, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise SystemExit(f"{store}: short append ({written} of {len(data)} bytes); check the file's last line")
    return len(new)


def summary_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["metric"], row["method"], row["budget"])].append(row["value"])
    lines = [f"{'metric':18s} {'method':18s} {'budget':>6s} {'mean':>6s} {'n':>4s}"]
    for (metric, method, budget), values in sorted(groups.items()):
        lines.append(f"{metric:18s} {method:18s} {budget:6.2f} {sum(values) / len(values):6.3f} {len(values):4d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("answers", nargs="+", help="raw answers JSONL from kvpress_eval.py eval (*.answers.jsonl)")
    p.add_argument("--out", help="scored rows JSONL (default: the first answers path without .answers)")
    p.add_argument("--tasks-store", help="task answers: append the scored rows to DIR/tasks.jsonl (new rows only)")
    p.add_argument("--families", help="comma list: score only the raw answers of these task families")
    args = p.parse_args(argv)
    raw = [json.loads(line) for path in args.answers for line in Path(path).read_text().splitlines() if line.strip()]
    if args.families:
        wanted = {f.strip() for f in args.families.split(",") if f.strip()}
        raw = [item for item in raw if item["task"] in wanted]
        if not raw:
            raise SystemExit(f"no raw answers of families {sorted(wanted)} in {args.answers}")
    if args.tasks_store:
        others = sorted({item["task"] for item in raw if not is_task_row(item)})
        if others:
            raise SystemExit(f"--tasks-store takes task answers only; these rows are of {others}")
        rows = score_task_rows(raw)
        store = Path(args.tasks_store) / "tasks.jsonl"
        written = append_new(rows, store)
        print(summary_table([{**r, "method": f"{r['method']}/{r['protocol']}"} for r in rows]))
        print(f"appended {written} new rows of {len(rows)} to {store}")
        return 0
    rows = score_rows(raw)
    first = Path(args.answers[0])
    out = Path(args.out) if args.out else first.with_name(first.name.replace(".answers.jsonl", ".jsonl"))
    if any(out == Path(a) for a in args.answers):
        raise SystemExit("--out would overwrite the raw answers; give another path")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(summary_table(rows))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
