"""The peer-comparison tools (``tools/bench_peers.py``, ``tools/peers/*.py``): only what needs no peer venv —
argument parsing, the prompt-ids file round trip, the exported-cell reader, the fallback scorers, and that
keepkv itself never imports transformers / kvpress / accelerate."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "tools" / "peers"
sys.path.insert(0, str(PEERS))
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers
import hf_decode
import kvpress_eval
import peer_common
import score_kvpress

from keepkv.eval.results import validate_row

PEER_PACKAGES = ("transformers", "kvpress", "accelerate")


def test_keepkv_never_imports_the_peers():
    code = (
        "import importlib, pkgutil, sys\n"
        "import keepkv, keepkv.models, keepkv.cache, keepkv.ops, keepkv.generate, keepkv.cli\n"
        "for m in pkgutil.walk_packages(keepkv.__path__, 'keepkv.'):\n"
        "    if not m.name.startswith('keepkv.integrations.'):  # the opt-in extras may import their peer\n"
        "        importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {PEER_PACKAGES!r})\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("script", ["peer_common.py", "hf_decode.py", "kvpress_eval.py"])
def test_peer_side_scripts_do_not_import_keepkv(script):
    tree = ast.parse((PEERS / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "keepkv" not in imported


def test_prompt_ids_round_trip(tmp_path):
    ids = [0, 5, 49151, 7, 7]
    path = bench_peers.write_prompt_file(tmp_path / "p" / "ids.json", ids, model="m")
    assert peer_common.read_prompt_ids(path) == ids
    assert bench_peers.read_prompt_file(path) == ids
    assert json.loads(path.read_text())["model"] == "m"


@pytest.mark.parametrize("content", ['{"input_ids": []}', '{"ids": [1]}', '{"input_ids": [1, -2]}', "[1, 2]",
                                    '{"input_ids": [1.5]}'])
def test_bad_prompt_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match="input_ids"):
        peer_common.read_prompt_ids(path)


def test_prompt_ids_repeat_text_to_the_context():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    text = ROOT / "tests" / "data" / "jargon_ch4-6.txt"
    n = len(text.read_text())
    ids = bench_peers.prompt_ids(Chars(), n + 10, text)
    assert len(ids) == n + 10 and ids[n:] == ids[:10]
    assert bench_peers.prompt_ids(Chars(), 16, text) == Chars().encode(text.read_text())[:16]


def test_hf_decode_arguments():
    args = hf_decode.parse_args(["--gguf", "m.gguf", "--prompt-ids", "i.json"])
    assert args.dtype == ["float32", "bfloat16"] and args.runs == 5 and args.threads == 2 and not args.serve
    args = hf_decode.parse_args(["--gguf", "m", "--prompt-ids", "i", "--dtype", "bfloat16", "--serve"])
    assert args.dtype == ["bfloat16"] and args.serve
    with pytest.raises(SystemExit):
        hf_decode.parse_args(["--gguf", "m", "--prompt-ids", "i", "--new-tokens", "2"])
    with pytest.raises(SystemExit):
        hf_decode.parse_args(["--gguf", "m", "--prompt-ids", "i", "--dtype", "float16"])


def test_kvpress_eval_arguments():
    args = kvpress_eval.parse_args(["eval", "--prompts", "p.jsonl", "--gguf", "m", "--model", "M", "--out", "o"])
    assert args.press == list(kvpress_eval.PRESS_NAMES) and args.budget == [0.05, 0.1, 0.2, 0.5]
    args = kvpress_eval.parse_args(["eval", "--prompts", "p", "--gguf", "m", "--model", "M", "--out", "o",
                                    "--press", "tova", "--budget", "1.0"])
    assert args.press == ["tova"] and args.budget == [1.0]
    with pytest.raises(SystemExit):
        kvpress_eval.parse_args(["eval", "--prompts", "p", "--gguf", "m", "--model", "M", "--out", "o",
                                 "--budget", "0"])
    with pytest.raises(SystemExit):
        kvpress_eval.parse_args(["eval", "--prompts", "p", "--gguf", "m", "--model", "M", "--out", "o",
                                 "--press", "h2o"])
    args = kvpress_eval.parse_args(["bench", "--gguf", "m", "--prompt-ids", "i"])
    assert args.bench_press == "snapkv" and args.compression_ratio == 0.9 and args.dtype == "float32"


def test_press_names_cover_the_brief():
    assert set(kvpress_eval.PRESS_NAMES) == {"snapkv", "streamingllm", "tova", "knorm", "expectedattention",
                                             "criticalkv", "adakv-snapkv"}
    with pytest.raises(SystemExit, match="compression_ratio"):
        kvpress_eval.make_press("snapkv", 1.0)


def test_read_cells(tmp_path):
    cell = {"task": "niah", "cell": "c0", "context": "hay", "question": "q?", "answers": ["7342819"],
            "context_tokens": 10, "depth": 0.5, "max_new_tokens": 8, "chat": True}
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(cell) + "\n\n" + json.dumps({**cell, "cell": "c1"}) + "\n")
    assert [c["cell"] for c in kvpress_eval.read_cells(path)] == ["c0", "c1"]
    path.write_text(json.dumps({k: v for k, v in cell.items() if k != "answers"}) + "\n")
    with pytest.raises(SystemExit, match="answers"):
        kvpress_eval.read_cells(path)


def test_score_rows_use_keepkv_scorers():
    raw = [{"task": "qa", "cell": "q0", "method": "snapkv", "variant": "", "budget": 0.1, "seed": 0,
            "answer": "Paris\n\nIt is in France.", "answers": ["paris", "Paris, France"], "model": "M",
            "kvpress_version": "0.5.5", "transformers_version": "5.2.0", "torch_version": "2.13.0",
            "kept_entries_mean": 12.0},
           {"task": "niah", "cell": "n0", "method": "tova", "variant": "", "budget": 0.5, "seed": 0,
            "answer": "It is 7,342,819.", "answers": ["7342819"], "model": "M"},
           {"task": "niah", "cell": "n1", "method": "tova", "variant": "", "budget": 0.5, "seed": 0,
            "answer": "It is 17342819.", "answers": ["7342819"], "model": "M"}]
    rows = score_kvpress.score_rows(raw)
    assert [(r["task"], r["metric"], r["value"]) for r in rows] == [
        ("qa", "qa_f1", 1.0), ("qa", "qa_exact_match", 1.0), ("niah", "niah_exact_match", 1.0),
        ("niah", "niah_digits", 1.0), ("niah", "niah_exact_match", 0.0), ("niah", "niah_digits", 1.0)]
    for row in rows:
        validate_row(row)  # every key the report needs: rows lacking one are skipped by read_rows
        assert row["engine"] == "kvpress"
    assert rows[0]["kept_entries_per_head"] == 12.0
    with pytest.raises(SystemExit, match="no scorer"):
        score_kvpress.score_rows([{**raw[0], "task": "ppl"}])


def test_bench_peers_arguments():
    args = bench_peers.parse_args([])
    assert args.model == list(bench_peers.ASSETS) and args.context == 4096 and args.budget == 0.1
    assert args.press == "snapkv" and args.method == "keepkv"
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--budget", "1.0"])
    assert bench_peers.agreement([1, 2, 3], [1, 2, 4]) == 2


def test_setup_pins_torch_exactly():
    import importlib.util

    spec = importlib.util.spec_from_file_location("peers_setup", PEERS / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    assert setup.TORCH == "torch==2.13.0"
    for pins in setup.PINS.values():
        assert all("==" in pin and not pin.startswith("torch") for pin in pins)
    assert any(pin.startswith("kvpress==") for pin in setup.PINS["kvpress"])


def test_kvpress_decodes_under_keepkv_limits():
    from types import SimpleNamespace

    cell = {"cell": "niah_single/len2048/s0", "max_new_tokens": 24}
    assert kvpress_eval.decode_allowance(cell) == 24
    assert kvpress_eval.decode_allowance({**cell, "decode_max_new_tokens": 64}) == 64
    with pytest.raises(SystemExit, match="allowance"):
        kvpress_eval.decode_allowance({**cell, "max_new_tokens": 0})
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    with kvpress_eval.stop_tokens(model, {**cell, "stop_token_ids": [2, 0]}):
        assert model.generation_config.eos_token_id == [2, 0]
    assert model.generation_config.eos_token_id == 2
    with kvpress_eval.stop_tokens(model, cell):
        assert model.generation_config.eos_token_id == 2


def test_task_prompts_rebuild_keepkv_batches():
    """keepkv decodes a mixed batch up to its largest max_new_tokens: the allowance follows the batch, not the
    record (batches of 2, sample-major: [niah s0, multivalue s0], [vt s0, niah s1], [multivalue s1, vt s1])."""
    import task_prompts

    from keepkv.eval.tasks import FAMILIES, load_tokenizer

    tokenizer, _ = load_tokenizer("SmolLM2-135M-Instruct")
    records = [{"task": family, "sample": sample, "cell": f"{family}/len2048/s{sample}", "length": 2048,
                "context": f"Some text {sample}.", "question": "Which number?", "answer_prefix": "It is",
                "answers": ["1"], "max_new_tokens": FAMILIES[family].max_new_tokens, "seed": 0, "haystack": "essays"}
               for family in ("niah_single", "multivalue", "vt") for sample in (0, 1)]
    out = {r["cell"]: r for r in task_prompts.with_ids(tokenizer, records, batch=2)}
    assert {c: r["decode_max_new_tokens"] for c, r in out.items()} == {
        "niah_single/len2048/s0": 64, "multivalue/len2048/s0": 64, "vt/len2048/s0": 32,
        "niah_single/len2048/s1": 32, "multivalue/len2048/s1": 64, "vt/len2048/s1": 64}
    assert out["vt/len2048/s0"]["keepkv_group"] == out["niah_single/len2048/s1"]["keepkv_group"]
    assert out["vt/len2048/s0"]["stop_token_ids"] == list(tokenizer.eos_token_ids)
    own = task_prompts.with_ids(tokenizer, records)
    assert [r["decode_max_new_tokens"] for r in own] == [r["max_new_tokens"] for r in records]
    row = {"unit": json.dumps(["tasks", "M", "snapkv", "", 0.2, out["vt/len2048/s0"]["keepkv_group"] + "/aware"]),
           "protocol": "aware"}
    assert task_prompts._group_of(row) == out["vt/len2048/s0"]["keepkv_group"]


def test_task_rows_append_once_per_decode_allowance(tmp_path):
    raw = {"task": "niah_single", "cell": "niah_single/len2048/s0", "method": "tova", "variant": "", "budget": 0.5,
           "seed": 0, "protocol": "aware", "answer": " 1234567.", "answers": ["1234567"], "model": "M",
           "haystack": "essays", "sample": 0}
    store = tmp_path / "tasks.jsonl"
    old = score_kvpress.score_task_rows([raw])
    assert old[0]["metric"] == "task_accuracy_aware" and old[0]["value"] == 1.0
    assert score_kvpress.append_new(old, store) == 1
    assert score_kvpress.append_new(old, store) == 0  # a rerun of the same rows adds nothing
    longer = score_kvpress.score_task_rows([{**raw, "max_new_tokens": 64, "answer": " 7654321."}])
    assert score_kvpress.append_new(longer, store) == 1  # keepkv's batch allowance: a new row, the latest wins
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert [(r["max_new_tokens"], r["value"]) for r in lines] == [(None, 1.0), (64, 0.0)]


def test_score_kvpress_families_filter(tmp_path):
    raw = {"cell": "c", "method": "tova", "variant": "", "budget": 0.5, "seed": 0, "protocol": "agnostic",
           "answer": " 1234567.", "answers": ["1234567"], "model": "M", "sample": 0}
    answers = tmp_path / "kvpress-M.answers.jsonl"
    answers.write_text("".join(json.dumps({**raw, "task": t, "cell": f"{t}/s0"}) + "\n"
                               for t in ("niah_single", "multikey")))
    assert score_kvpress.main([str(answers), "--families", "niah_single", "--tasks-store", str(tmp_path)]) == 0
    assert [json.loads(line)["family"] for line in (tmp_path / "tasks.jsonl").read_text().splitlines()] == [
        "niah_single"]
    with pytest.raises(SystemExit, match="no raw answers"):
        score_kvpress.main([str(answers), "--families", "vt", "--tasks-store", str(tmp_path)])
