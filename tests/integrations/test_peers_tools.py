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
