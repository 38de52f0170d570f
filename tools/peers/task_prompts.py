"""keepkv's exact prompt tokens for a task export, so kvpress runs the very ids keepkv ran (keepkv's venv; NOT the
kvpress venv).

``keepkv eval export-tasks`` writes kvpress's columns (``context``, ``question``, ``answer_prefix``, ``answers``,
``max_new_tokens`` + keepkv's ``task``, ``cell``, ``sample``, ...). This script adds to every record the two token
lists keepkv itself feeds (:func:`keepkv.eval.tasks.prompt_ids`: the chat template renders ``context + question``
as one user turn, the assistant turn opened and started with ``answer_prefix``; split at the question's start)::

    "context_ids": [...], "question_ids": [...], "context_tokens": len(context_ids), "target_tokens": length,
    "stop_token_ids": [...], "decode_max_new_tokens": N, "keepkv_group": "..." (with --batch)

``stop_token_ids``: keepkv's end tokens (its tokenizer's ``eos_token_ids``; kvpress stops at the GGUF's single
``eos_token_id`` otherwise). ``decode_max_new_tokens``: how many tokens keepkv let the record's answer take. keepkv
decodes a batch of rows together up to the LARGEST ``max_new_tokens`` of the batch
(``keepkv.eval.prompted.run_prompted``), and its task batches mix families (``keepkv.eval.tasks.task_groups``,
sample-major), so e.g. a ``niah_single`` answer (24 of its own) ran with the 64 of the ``multivalue`` row beside it.
``--batch N`` (keepkv's ``--batch``; the headline grid's ``task_batch`` is 7) rebuilds keepkv's batches of the
export with ``task_groups`` and writes each record's batch maximum and the batch's name (``keepkv_group``); without
it, the record's own ``max_new_tokens``.

``tools/peers/kvpress_eval.py eval`` uses them instead of re-tokenizing (``ids_source: "keepkv"`` in its rows)
and builds both protocols from them exactly as ``keepkv.eval.prompted`` does (agnostic: ``context_ids`` compressed,
``question_ids`` fed; aware: ``context_ids + question_ids[:-1]`` compressed, ``question_ids[-1:]`` fed).

``--check RESULTS_DIR``: every record must match keepkv's stored task rows of the same cell (the same prompt
tokens, by the rows' ``prompt_digest`` where they have one, else the same ``context_tokens`` and ``prompt_tokens``;
and keepkv's stored answers re-scored against the export's ``answers`` give the stored values), so the peer answers the samples keepkv's rows answered; with ``--batch``, keepkv's rows of
every record must include rows of the rebuilt batch (the group in their ``unit``), so the decode allowance is the
one keepkv's rows had; a mismatch stops the script. The output is named ``prompts-*.jsonl`` so that ``keepkv eval report`` does not read it.

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


def with_ids(tokenizer, records: list[dict], batch: int | None = None) -> list[dict]:
    """Records with keepkv's ids, end tokens and decode allowance (see the module docstring)."""
    groups = keepkv_batches(tokenizer, records, batch) if batch else {}
    out = []
    for record in records:
        context_ids, question_ids = prompt_ids(tokenizer, record["context"], record["question"],
                                               record["answer_prefix"])
        group, allowance = groups.get(record["cell"], (None, int(record["max_new_tokens"])))
        out.append({**record, "context_ids": context_ids, "question_ids": question_ids,
                    "context_tokens": len(context_ids), "target_tokens": record.get("length"),
                    "stop_token_ids": [int(t) for t in tokenizer.eos_token_ids],
                    "decode_max_new_tokens": allowance, "keepkv_group": group})
    return out


def keepkv_batches(tokenizer, records: list[dict], batch: int) -> dict[str, tuple[str, int]]:
    """``cell -> (keepkv's batch name, the batch's largest max_new_tokens)``: keepkv's own grouping
    (:func:`keepkv.eval.tasks.task_groups` of :func:`~keepkv.eval.tasks.record_cell`) of an export that holds
    exactly the records keepkv's run generated (same families, lengths and sample count, one seed and haystack)."""
    from keepkv.eval.tasks import check_unique_cells, record_cell, scoring_of, task_groups

    # keepkv's run names every cell's source after the run's haystack (``seed<S>-<haystack>``); the QA records'
    # ``haystack`` field is their data set (squad, hotpot), so the needle families' records give the run's
    sources = {f"seed{r.get('seed', 0)}-{r.get('haystack') or 'essays'}" for r in records
               if scoring_of(r["task"]) != "qa"} or {f"seed{records[0].get('seed', 0)}-essays"}
    if len(sources) != 1:
        raise SystemExit(f"--batch needs an export of one seed and haystack, got {sorted(sources)}")
    source = sources.pop()
    cells = [record_cell(tokenizer, r, source, i) for i, r in enumerate(check_unique_cells(records))]
    out = {}
    for name, members in task_groups(cells, batch).items():
        allowance = max(cell.max_new_tokens for cell in members)
        out.update({cell.cell: (name, allowance) for cell in members})
    return out


def check_against(records: list[dict], results: Path, model: str) -> int:
    """Number of keepkv rows checked: every stored keepkv task row of a record's cell must have the record's
    ``context_tokens`` and ``prompt_tokens``, and its stored answer scored against the record's ``answers`` with
    keepkv's scorer must give its stored value (same needle). With ``keepkv_group`` (``--batch``) only the rows of
    that batch are checked (there must be some); rows of other runs under the same cell name that are not this
    sample (a generator changed since) are reported on stderr. SystemExit on the first mismatch or a missing
    cell."""
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
        group = record.get("keepkv_group")
        if group is not None:  # compare with the rows of keepkv's batch; older runs of the cell name are reported
            ours = [row for row in rows if "unit" in row and _group_of(row) == group]
            if not ours:
                raise SystemExit(f"{record['cell']}: keepkv has no row of the rebuilt batch {group!r} (--batch "
                                 f"differs from keepkv's run, or the export holds other samples); its rows ran in "
                                 f"{sorted({_group_of(row) for row in rows if 'unit' in row})}")
            others = [row for row in rows if row not in ours]
            stale = [row for row in others if _mismatch(record, row)]
            if stale:
                print(f"note: {record['cell']}: {len(stale)} of {len(others)} keepkv rows of other runs "
                      f"({sorted({_group_of(row) for row in stale})}) are not this sample: "
                      f"{_mismatch(record, stale[0])}", file=sys.stderr)
            rows = ours
        for row in rows:
            problem = _mismatch(record, row)
            if problem:
                raise SystemExit(f"{record['cell']}: {problem}")
            checked += 1
    return checked


def _mismatch(record: dict, row: dict) -> str | None:
    """Why keepkv's stored ``row`` is not an answer to ``record`` (other token counts, or its stored answer
    re-scored against the record's ``answers`` gives another value), or None."""
    from types import SimpleNamespace

    from keepkv.eval.tasks import score_task, scoring_of

    from keepkv.eval.results import prompt_digest

    digest = row.get("prompt_digest")
    if digest is not None and digest != prompt_digest(record["context_ids"], record["question_ids"]):
        return f"keepkv's row was written from other prompt tokens (digest {digest}): not the sample keepkv ran"
    prompt = len(record["context_ids"]) + len(record["question_ids"])
    if (row["context_tokens"], row["prompt_tokens"]) != (record["context_tokens"], prompt):
        return (f"export gives context/prompt tokens {(record['context_tokens'], prompt)}, keepkv's row "
                f"{(row['context_tokens'], row['prompt_tokens'])}: not the samples keepkv ran")
    cell = SimpleNamespace(answers=list(record["answers"]), extra={"scoring": scoring_of(record["task"])})
    if abs(score_task(row["answer"], cell)["task_accuracy"] - float(row["value"])) > 1e-9:
        return (f"keepkv's stored answer {row['answer']!r} (value {row['value']}) does not score the same against "
                f"the export's answers {record['answers']}")
    return None


def _group_of(row: dict) -> str:
    """The batch (group) name in a keepkv row's ``unit``, without the ``/<protocol>`` suffix of
    ``run_prompted``."""
    group = json.loads(row["unit"])[5]
    suffix = f"/{row.get('protocol')}"
    return group[: -len(suffix)] if row.get("protocol") not in (None, "agnostic") and group.endswith(suffix) else group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="JSONL from keepkv eval export-tasks")
    p.add_argument("--model", required=True, help="the model whose tokenizer keepkv used")
    p.add_argument("--out", required=True, help="prompts-*.jsonl for kvpress_eval.py eval --prompts")
    p.add_argument("--check", help="a results directory with keepkv's task rows of these cells")
    p.add_argument("--families", help="comma list: write (and check) only these families' records; keepkv's "
                                      "batches are still rebuilt from the whole export")
    p.add_argument("--batch", type=int, default=0,
                   help="keepkv's task batch of the run (headline grid: 7): each record's decode allowance is its "
                        "batch's largest max_new_tokens, as in keepkv's run (default: the record's own)")
    args = p.parse_args(argv)
    if not Path(args.out).name.startswith("prompts"):
        raise SystemExit("--out must be named prompts-*.jsonl (keepkv eval report skips those files)")
    tokenizer, _ = load_tokenizer(args.model)
    records = with_ids(tokenizer, read_dataset(args.export), args.batch or None)
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = sorted(set(wanted) - {r["task"] for r in records})
        if unknown:
            raise SystemExit(f"--families {unknown} not in the export; it holds {sorted({r['task'] for r in records})}")
        records = [r for r in records if r["task"] in wanted]
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
