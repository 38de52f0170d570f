"""The evaluation's ``chunked`` protocol: ``generate()``'s chunked prefill (compressions mid-prompt and at its end),
reported apart from the shared-prefill protocols."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def eval_model(smollm2_gguf):
    from keepkv.eval.session import EvalModel

    return EvalModel(str(smollm2_gguf), prefill_chunk_size=128)


@pytest.mark.real_model
def test_chunked_protocol_rows_and_report(eval_model, tmp_path):
    """The ``chunked`` protocol: rows tagged with it (metric suffix ``_chunked``); the full cache answers as in the
    shared-prefill protocols; a budgeted cache holds its budget after prefill; the report gives it a table."""
    from keepkv.eval.report import write_report
    from keepkv.eval.results import MethodConfig, ResultStore, read_rows
    from keepkv.eval.tasks import run_tasks

    store = ResultStore(tmp_path)
    configs = [MethodConfig.parse("full"), MethodConfig.parse("keepkv")]
    run_tasks(eval_model, configs, [0.2], store, families=["niah_single"], lengths=[512], samples=2, batch=2,
              protocols=("chunked", "aware"), progress=False)
    rows = [r for r in read_rows(tmp_path) if r["task"] == "tasks"]
    chunked = [r for r in rows if r["protocol"] == "chunked"]
    aware = [r for r in rows if r["protocol"] == "aware"]
    assert {r["metric"] for r in chunked} == {"task_accuracy_chunked"} and len(chunked) == len(aware) == 4
    answers = {(r["protocol"], r["method"], r["cell"]): r["answer"] for r in rows}
    for r in chunked:
        if r["method"] == "full":
            assert r["answer"] == answers[("aware", "full", r["cell"])]
        else:
            assert r["kept_entries_per_head"] <= 0.2 * r["context_tokens"] + 2 * 64  # the budget, question included
    # resuming: nothing is redone; a unit that lost a cell's row is redone whole (the new rows supersede)
    run_tasks(eval_model, configs, [0.2], ResultStore(tmp_path), families=["niah_single"], lengths=[512], samples=2,
              batch=2, protocols=("chunked", "aware"), progress=False)
    assert len([r for r in read_rows(tmp_path) if r["task"] == "tasks"]) == len(rows)
    assert all(r["prompt_digest"] for r in rows)
    lost = next(r for r in aware if r["method"] == "keepkv")
    kept_lines = [line for line in (tmp_path / "tasks.jsonl").read_text().splitlines()
                  if not (f'"cell": "{lost["cell"]}"' in line and '"method": "keepkv"' in line
                          and '"protocol": "aware"' in line)]
    (tmp_path / "tasks.jsonl").write_text("\n".join(kept_lines) + "\n")
    run_tasks(eval_model, configs, [0.2], ResultStore(tmp_path), families=["niah_single"], lengths=[512], samples=2,
              batch=2, protocols=("chunked", "aware"), progress=False)
    redone = [r for r in read_rows(tmp_path) if r["task"] == "tasks"]
    assert len(redone) == len(rows) - 1 + 2  # the keepkv/aware unit again: both cells of its batch
    again = {r["cell"]: r["answer"] for r in redone[len(rows) - 1:]}
    assert again == {r["cell"]: r["answer"] for r in aware if r["method"] == "keepkv"}
    write_report(tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "chunked prefill" in report and "keepkv" in report
