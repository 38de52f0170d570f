"""keepkv's exact prompt tokens for a task export, so kvpress runs the very ids keepkv ran (keepkv's venv; NOT the
kvpress venv).

``keepkv eval export-tasks`` writes kvpress's columns (``context``, ``question``, ``answer_prefix``, ``answers``,
``max_new_tokens`` + keepkv's ``task``, ``cell``, ``sample``, ...). This script adds to every record the two token
lists keepkv itself feeds (:func:`keepkv.eval.tasks.prompt_ids`: the chat template renders ``context + question``
as one user turn, the assistant turn opened and started with ``answer_prefix``; split at the question's start)::

    "context_ids": [...], "question_ids": [...], "context_tokens": len(context_ids), "target_tokens": length

``tools/peers/kvpress_eval.py eval`` uses them instead of re-tokenizing (``ids_source: "keepkv"`` in its rows)
and builds both protocols from them exactly as ``keepkv.eval.prompted`` does (agnostic: ``context_ids`` compressed,
``question_ids`` fed; aware: ``context_ids + question_ids[:-1]`` compressed, ``question_ids[-1:]`` fed).

``--check RESULTS_DIR``: every record must match keepkv's stored task rows of the same cell (same
``context_tokens`` and ``prompt_tokens``, and keepkv's stored answers re-scored against the export's ``answers``
give the stored values), so the peer answers the samples keepkv's rows answered; a mismatch
stops the script. The output is named ``prompts-*.jsonl`` so that ``keepkv eval report`` does not read it.

    .venv/bin/python tools/peers/task_prompts.py EXPORT.jsonl --model SmolLM2-135M-Instruct \\
        --check results/tasks --out results/tasks/peers/prompts-SmolLM2-135M-Instruct-niah_single-2048.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keepkv.eval.dataset import read_dataset
from keepkv.eval.results import read_rows
from keepkv.eval.tasks import load_tokenizer, prompt_ids


def with_ids(tokenizer, records: list[dict]) -> list[dict]:
    out = []
    for record in records:
        context_ids, question_ids = prompt_ids(tokenizer, record["context"], record["question"],
                                               record["answer_prefix"])
        out.append({**record, "context_ids": context_ids, "question_ids": question_ids,
                    "context_tokens": len(context_ids), "target_tokens": record.get("length")})
    return out


def check_against(records: list[dict], results: Path, model: str) -> int:
    """Number of keepkv rows checked: every stored keepkv task row of a record's cell must have the record's
    ``context_tokens`` and ``prompt_tokens``, and its stored answer scored against the record's ``answers`` with
    keepkv's scorer must give its stored value (same needle). SystemExit on the first mismatch or a missing cell."""
    from types import SimpleNamespace

    from keepkv.eval.tasks import score_task, scoring_of

    by_cell: dict[str, list[dict]] = {}
    for row in read_rows(results):
        if row.get("task") == "tasks" and row.get("engine", "keepkv") == "keepkv" and row["model"] == model \
                and row["metric"] in ("task_accuracy", "task_accuracy_aware"):
            by_cell.setdefault(row["cell"], []).append(row)
    checked = 0
    for record in records:
        rows = by_cell.get(record["cell"])
        if not rows:
            raise SystemExit(f"{record['cell']}: no keepkv row of {model} in {results}")
        prompt = len(record["context_ids"]) + len(record["question_ids"])
        cell = SimpleNamespace(answers=list(record["answers"]), extra={"scoring": scoring_of(record["task"])})
        for row in rows:
            if (row["context_tokens"], row["prompt_tokens"]) != (record["context_tokens"], prompt):
                raise SystemExit(f"{record['cell']}: export gives context/prompt tokens "
                                 f"{(record['context_tokens'], prompt)}, keepkv's row "
                                 f"{(row['context_tokens'], row['prompt_tokens'])}: not the samples keepkv ran")
            if abs(score_task(row["answer"], cell)["task_accuracy"] - float(row["value"])) > 1e-9:
                raise SystemExit(f"{record['cell']}: keepkv's stored answer {row['answer']!r} (value {row['value']}) "
                                 f"does not score the same against the export's answers {record['answers']}")
            checked += 1
    return checked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="JSONL from keepkv eval export-tasks")
    p.add_argument("--model", required=True, help="the model whose tokenizer keepkv used")
    p.add_argument("--out", required=True, help="prompts-*.jsonl for kvpress_eval.py eval --prompts")
    p.add_argument("--check", help="a results directory with keepkv's task rows of these cells")
    args = p.parse_args(argv)
    if not Path(args.out).name.startswith("prompts"):
        raise SystemExit("--out must be named prompts-*.jsonl (keepkv eval report skips those files)")
    tokenizer, _ = load_tokenizer(args.model)
    records = with_ids(tokenizer, read_dataset(args.export))
    if args.check:
        print(f"checked {len(records)} records against {check_against(records, Path(args.check), args.model)} "
              f"keepkv rows in {args.check}: same token counts, same scores", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} records with keepkv's ids to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
