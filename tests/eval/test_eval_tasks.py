"""RULER-style tasks (keepkv/eval/tasks.py), kvpress-column datasets (keepkv/eval/dataset.py) and their report
section: generation with the real SmolLM2 tokenizer (no model run), scoring on hand-made answers, dataset round
trips and refusals, and one tiny end-to-end ``keepkv eval tasks`` on SmolLM2."""

from __future__ import annotations

import json
import re

import pytest

from keepkv.errors import KeepKVError
from keepkv.eval import tasks
from keepkv.eval.dataset import REQUIRED_COLUMNS, read_dataset, write_dataset
from keepkv.eval.results import REQUIRED_KEYS

NEEDLE_FAMILIES = ["niah_single", "multikey", "multivalue", "multiquery", "vt"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return tasks.load_tokenizer(str(smollm2_gguf))[0]


@pytest.fixture(scope="module")
def eval_data():
    from keepkv.eval.data import eval_data_dir

    try:
        return eval_data_dir()
    except KeepKVError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("family", list(tasks.FAMILIES))
def test_generation_is_deterministic_in_seed_and_fits_the_length(tokenizer, eval_data, family):
    a = tasks.generate_sample(tokenizer, family, 1024, 3, seed=5)
    assert a == tasks.generate_sample(tokenizer, family, 1024, 3, seed=5)
    assert a["context"] != tasks.generate_sample(tokenizer, family, 1024, 3, seed=6)["context"]
    assert a["context"] != tasks.generate_sample(tokenizer, family, 1024, 4, seed=5)["context"]
    assert set(REQUIRED_COLUMNS) <= set(a) and a["task"] == family and a["length"] == 1024 and a["sample"] == 3
    for length in (1024, 2048):
        record = tasks.generate_sample(tokenizer, family, length, 0)
        total = tasks.prompt_tokens(tokenizer, record) + record["max_new_tokens"]
        assert length * (1 - tasks.LENGTH_TOLERANCE) <= total <= length, (family, length, total)


def test_qa_samples_whose_first_fit_overshoots_are_topped_up_to_the_length(tokenizer, eval_data):
    """HotpotQA samples 3 and 4 at 2048 tokens: the per-paragraph token estimates undershoot the joined prompt, the
    last paragraph is dropped, and the first fit alone left 1902 / 1923 of 2016 tokens (an error); later
    paragraphs that still fit top it up."""
    for sample in (3, 4):
        record = tasks.generate_sample(tokenizer, "qa_hotpot", 2048, sample)
        total = tasks.prompt_tokens(tokenizer, record) + record["max_new_tokens"]
        assert 2048 * (1 - tasks.LENGTH_TOLERANCE) <= total <= 2048, (sample, total)
        assert record["answers"][0] and record["question"].startswith("Question:")


@pytest.mark.parametrize("family", NEEDLE_FAMILIES)
def test_needles_occur_once_and_distractors_differ_from_answers(tokenizer, eval_data, family):
    for sample in range(3):
        record = tasks.generate_sample(tokenizer, family, 1024, sample)
        context, answers, distractors = record["context"], record["answers"], record["distractors"]
        assert not set(answers) & set(distractors)
        assert len(set(answers)) == len(answers) == {"niah_single": 1, "multikey": 1, "multivalue": 4,
                                                     "multiquery": 4, "vt": 5}[family]
        assert len(distractors) == (3 if family == "multikey" else 0)
        if family == "vt":  # the chain VAR A = value. VAR B = VAR A. ... in order; each name assigned once
            chain = re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?(\w+)\.", context)
            assert [name for name, _ in chain] == answers
            assert [source for _, source in chain[1:]] == answers[:-1]
            assert all(context.count(f"VAR {name} =") == 1 for name in answers)
            continue
        for value in answers + distractors:
            assert context.count(value) == 1
        if family == "multikey":  # the asked key's needle holds the answer; the other keys are not asked
            key = re.search(r"for ([a-z]+-[a-z]+) mentioned", record["question"]).group(1)
            assert f"for {key} is: {answers[0]}." in context


def test_qa_gold_passage_is_in_the_context(tokenizer, eval_data):
    squad = tasks.generate_sample(tokenizer, "qa_squad", 1024, 1)
    assert any(answer in squad["context"] for answer in squad["answers"])
    assert squad["context"].count("Document ") >= 3  # distractor passages around the gold one
    hotpot = tasks.generate_sample(tokenizer, "qa_hotpot", 1024, 1)
    assert hotpot["question"].startswith("Question: ") and hotpot["answer_prefix"] == "Answer:"


def test_scoring_on_handmade_answers():
    assert tasks.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert tasks.string_match_all(" ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert tasks.string_match_all("nothing here", ["1234567"]) == 0.0
    with pytest.raises(KeepKVError):
        tasks.string_match_all("x", [])
    from types import SimpleNamespace

    match = SimpleNamespace(answers=["1234567", "2345678"], extra={"scoring": "match"})
    assert tasks.score_task(" 1234567 and 9999999", match) == {"task_accuracy": 0.5}
    qa = SimpleNamespace(answers=["Denver Broncos"], extra={"scoring": "qa"})
    assert tasks.score_task(" the Denver Broncos\n\nextra text", qa) == {"task_accuracy": 1.0,
                                                                           "task_exact_match": 1.0}
    partial = tasks.score_task(" Broncos", qa)
    assert partial["task_exact_match"] == 0.0 and partial["task_accuracy"] == pytest.approx(2 / 3)
    assert tasks.scoring_of("qa_2") == "qa" and tasks.scoring_of("niah_multikey_1") == "match"


def _records():
    return [{"context": "Some text. The key is 12.\n\n", "question": "What is the key?", "answer_prefix": "Answer:",
             "answers": ["12"], "max_new_tokens": 8, "task": "toy", "length": 64, "sample": i} for i in range(3)]


def test_dataset_round_trip_jsonl_and_parquet(tmp_path):
    records = _records()
    assert read_dataset(write_dataset(records, tmp_path / "d.jsonl")) == records
    pytest.importorskip("pyarrow")
    assert read_dataset(write_dataset(records, tmp_path / "d.parquet")) == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.parquet"]  # no temporary files left


def test_missing_columns_and_bad_values_are_refused_and_nothing_is_half_written(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(KeepKVError, match="missing columns answer_prefix, max_new_tokens"):
        read_dataset(path)
    records = _records()
    records[2] = {**records[2], "answers": []}
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeepKVError, match="record 2: answers"):
        write_dataset(records, out)
    with pytest.raises(KeepKVError, match="unknown dataset format"):
        write_dataset(_records(), tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    from keepkv.cli import main

    # refused before any model is loaded (the model name does not even exist)
    assert main(["eval", "tasks", "no-such-model", "--dataset", str(path), "--results", str(tmp_path / "r")]) == 2
    assert main(["eval", "tasks", "no-such-model", "--tasks", "niah_single,bogus"]) == 2
    twins = write_dataset([{**r, "sample": 0} for r in _records()], tmp_path / "twins.jsonl")
    with pytest.raises(KeepKVError, match="share cell names"):
        tasks.check_unique_cells(read_dataset(twins))
    assert main(["eval", "tasks", "no-such-model", "--dataset", str(twins)]) == 2


def test_task_groups_mix_families_and_name_their_content():
    from keepkv.eval.data import PromptCell

    def cells(families, samples):
        return [PromptCell("tasks", f"{f}/len512/s{k}", "c", "q", ["a"], [1], [2], 8,
                           {"family": f, "source": "src", "target_tokens": 512, "sample": k})
                for f in families for k in range(samples)]

    groups = tasks.task_groups(cells(["a", "b", "c"], 3), 4)
    assert [[c.cell.split("/")[0] + c.cell[-1] for c in g] for g in groups.values()] == [
        ["a0", "b0", "c0", "a1"], ["b1", "c1", "a2", "b2"], ["c2"]]
    assert list(groups) == list(tasks.task_groups(cells(["a", "b", "c"], 3), 4))  # deterministic
    # other sample counts or families: no group of the same name holds other cells
    for other in (tasks.task_groups(cells(["a", "b", "c"], 4), 4), tasks.task_groups(cells(["a", "b"], 3), 4)):
        for name in set(groups) & set(other):
            assert [c.cell for c in groups[name]] == [c.cell for c in other[name]]
        assert set(other) != set(groups)


def test_first_sample_extends_a_run_with_the_same_samples_in_new_batches(tokenizer, eval_data, capsys):
    """``first_sample``: samples 2..3 generated alone equal samples 2..3 of a 4-sample run; their batches have names
    of their own (a stored run's batches are neither regrouped nor rerun); a start outside [0, samples) and
    ``--first-sample`` with ``--dataset`` are refused before any model loads."""
    from keepkv.cli import main

    families = ["niah_single", "vt"]
    whole = tasks.generate_tasks(tokenizer, families, [512], 4)
    tail = tasks.generate_tasks(tokenizer, families, [512], 4, first_sample=2)
    assert [r["sample"] for r in tail] == [2, 3, 2, 3] and tail == [r for r in whole if r["sample"] >= 2]
    head = tasks.generate_tasks(tokenizer, families, [512], 2)

    def groups(records):
        return tasks.task_groups([tasks.record_cell(tokenizer, r, "src", i) for i, r in enumerate(records)], 3)

    # a stored 2-sample run's batches: regrouping all 4 samples renames (reruns) its second batch; the head's
    # batches plus the tail's own cover the 4 samples once, with the head's names unchanged
    old, regrouped, extension = groups(head), groups(whole), groups(tail)
    assert set(old) - set(regrouped)
    cells = [c.cell for part in (*old.values(), *extension.values()) for c in part]
    assert sorted(cells) == sorted(c.cell for part in regrouped.values() for c in part) and len(set(cells)) == 8
    for bad in (-1, 4, 9):
        with pytest.raises(KeepKVError, match=r"first sample must be in \[0, samples\) = \[0, 4\)"):
            tasks.generate_tasks(tokenizer, families, [512], 4, first_sample=bad)
    cases = ((["--samples", "3", "--first-sample", "3"], r"--first-sample must be in \[0, samples\) = \[0, 3\) "
              r"\(--samples\), got 3"),
             (["--samples", "-2"], r"--samples must be >= 1, got -2"),
             (["--first-sample", "1", "--dataset", "x.jsonl"], "cannot be used with --dataset"))
    for command in ("tasks", "export-tasks"):  # refused before the (missing) model's tokenizer is read
        for args, message in cases[:2]:
            out = ["--out", "x.jsonl"] if command == "export-tasks" else []
            assert main(["eval", command, "no-such-model", "--tasks", "vt", "--lengths", "512", *args, *out,
                         "--no-progress"]) == 2
            assert re.search(message, capsys.readouterr().err)
    assert main(["eval", "tasks", "no-such-model", "--tasks", "vt", *cases[2][0], "--no-progress"]) == 2
    assert re.search(cases[2][1], capsys.readouterr().err)


def test_first_sample_reaches_the_task_runner(monkeypatch):
    """``keepkv eval tasks --first-sample`` is handed to ``run_tasks`` (and ``keepkv eval all``'s call, which has no
    arguments, gives 0)."""
    import argparse

    from keepkv.cli.eval import run_one
    from keepkv.eval.grid import GRIDS

    seen = []
    monkeypatch.setattr(tasks, "run_tasks", lambda *a, **kw: seen.append(kw["first_sample"]) or 0)
    g = GRIDS["quick"][0]
    args = argparse.Namespace(first_sample=3, samples=5, methods="full", budgets=None, dataset=None)
    run_one("tasks", object(), g, None, seed=0, progress=False, args=args)
    run_one("tasks", object(), g, None, seed=0, progress=False, args=None)
    assert seen == [3, 0]


def test_stratified_interval_weighs_families_equally():
    from keepkv.eval.tasks_report import stratified_interval

    low, high = stratified_interval({"a": [1.0] * 40, "b": [0.0, 0.0]})
    assert low == high == 0.5  # family means are fixed, so is their mean
    low, high = stratified_interval({"a": [0.0, 1.0] * 10, "b": [1.0] * 5})
    assert 0.5 < low < 0.75 < high < 1.0


def test_bootstrap_resamples_within_strata_and_drops_undefined_statistics():
    """The shared bootstrap: strata are resampled separately (a stratum of one repeated value never moves), the
    interval brackets the statistic, is reproducible by seed, and resamples whose statistic is undefined are
    dropped (none defined: NaN)."""
    import math

    from keepkv.eval.bootstrap import mean_interval, stratified_interval

    strata = {"fixed": [2.0] * 3, "noisy": [0.0, 1.0, 0.0, 1.0, 1.0]}
    low, high = stratified_interval(strata, lambda s: sum(s["fixed"]) / 3)
    assert low == high == 2.0
    low, high = stratified_interval(strata, lambda s: sum(s["noisy"]) / 5)
    assert 0.0 <= low < 0.6 < high <= 1.0 and (low, high) == mean_interval(strata["noisy"])
    assert mean_interval([0.3]) == (0.3, 0.3) and all(math.isnan(v) for v in mean_interval([]))
    only_ones = stratified_interval(strata, lambda s: None if sum(s["noisy"]) < 3 else sum(s["noisy"]) / 5)
    assert 0.6 <= only_ones[0] <= only_ones[1] <= 1.0  # resamples with fewer than three ones were dropped
    assert all(math.isnan(v) for v in stratified_interval(strata, lambda s: None))


def test_eval_tasks_end_to_end_is_resumable_and_reported(tmp_path, smollm2_gguf):
    """``keepkv eval tasks`` on SmolLM2: one ~512-token single-needle sample, the full cache and SnapKV at 50%, both
    protocols; schema-valid rows with resolved options; the report has the tasks section (resuming is the shared
    runner's, tested in test_eval_model.py; the unit names it relies on: test_task_groups_...)."""
    pytest.importorskip("matplotlib")
    from keepkv.cli import main

    results = tmp_path / "results"
    args = ["eval", "tasks", str(smollm2_gguf), "--tasks", "niah_single", "--lengths", "512", "--samples", "1",
            "--methods", "full,snapkv", "--budgets", "0.5", "--protocols", "aware,agnostic", "--results",
            str(results), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (results / "tasks.jsonl").read_text().splitlines()]
    assert all(set(REQUIRED_KEYS) <= set(r) for r in rows)
    assert {(r["method"], r["protocol"]) for r in rows} == {(m, p) for m in ("full", "snapkv")
                                                            for p in ("aware", "agnostic")}
    assert {r["metric"] for r in rows} == {"task_accuracy", "task_accuracy_aware"}
    assert all(r["family"] == "niah_single" and 480 <= r["prompt_tokens"] + 24 <= 512 for r in rows)
    snap = [r for r in rows if r["method"] == "snapkv"]
    assert all(r["resolved_options"] and 0 < r["kept_entries_per_head"] < r["context_tokens"] for r in snap)
    full = [r for r in rows if r["method"] == "full"]
    assert all(r["value"] == 1.0 for r in full), [r["answer"] for r in full]  # the prompt works uncompressed
    assert main(["eval", "report", "--results", str(results)]) == 0
    report = (results / "REPORT.md").read_text()
    assert "RULER-style tasks" in report and "niah_single" in report and "mean over tasks" in report
    assert any(p.name.startswith("tasks_") and p.suffix == ".png" for p in results.iterdir())


def _peer_module(name: str):
    """A script of tools/peers loaded by path (its sibling ``peer_common`` first: the scripts import it bare)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "tools" / "peers"
    for module in ("peer_common", name):
        if module not in sys.modules:
            spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
            sys.modules[module] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[module])
    return sys.modules[name]


def test_kvpress_task_rows_are_scored_by_keepkv_and_shown_beside_keepkv(tmp_path):
    """tools/peers: kvpress's raw task answers scored by ``tasks.score_task`` into keepkv's task-row shape,
    appended to the store once (resumable), and reported as ``snapkv [kvpress]`` next to keepkv's rows; the aware
    protocol split is keepkv's (everything but the prompt's last token compressed)."""
    from keepkv.eval.results import validate_row
    from keepkv.eval.tasks_report import summarise, tables

    kvpress_eval, score = _peer_module("kvpress_eval"), _peer_module("score_kvpress")
    assert kvpress_eval.protocol_split([1, 2, 3], [4, 5, 6], "aware") == ([1, 2, 3, 4, 5], [6])
    assert kvpress_eval.protocol_split([1, 2, 3], [4, 5, 6], "agnostic") == ([1, 2, 3], [4, 5, 6])
    raw = [{"task": "niah_single", "cell": f"niah_single/len2048/s{k}", "method": "snapkv", "variant": "",
            "budget": 0.5, "seed": 0, "haystack": "essays", "sample": k, "protocol": protocol, "model": "M",
            "answer": " 1234567." if k else " 7654321.", "answers": ["1234567"], "kept_entries_mean": 990.0,
            "context_tokens_peer": 1980} for k in range(2) for protocol in ("aware", "agnostic")]
    rows = score.score_task_rows(raw)
    for row in rows:
        validate_row(row)
    assert [(r["metric"], r["value"]) for r in rows] == [("task_accuracy_aware", 0.0), ("task_accuracy", 0.0),
                                                        ("task_accuracy_aware", 1.0), ("task_accuracy", 1.0)]
    assert all(r["task"] == "tasks" and r["engine"] == "kvpress" and json.loads(r["unit"])[0] == "kvpress"
               for r in rows)
    assert score.append_new(rows, tmp_path / "tasks.jsonl") == 4
    assert score.append_new(rows, tmp_path / "tasks.jsonl") == 0  # resumable: nothing twice
    mine = [{**r, "engine": "keepkv", "method": "snapkv", "value": 1.0, "unit": "u"} for r in rows]
    table = tables(summarise(mine + rows))
    assert "| snapkv [kvpress] | 50% | 990 | 0.50 [0.00, 1.00]" in table
    assert "| snapkv | 50% | 990 | 1.00 [1.00, 1.00]" in table


def test_numbers_are_the_same_in_every_process():
    """Multi-key / multi-value / multi-query needles pair keys with values drawn by ``_numbers``: the list must not
    depend on the process's string-hash seed (it came from a ``set``'s order once, so a sample differed between
    the keepkv run and its export)."""
    import os
    import subprocess
    import sys

    code = ("import random; from keepkv.eval.tasks import _numbers; "
            "print(_numbers(random.Random(3), 8), _numbers(random.Random(4), 4, digits=5))")
    outputs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1, outputs
