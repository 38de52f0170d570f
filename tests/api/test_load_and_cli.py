"""load() and the command line: what is accepted, and clear errors (nothing half-loaded) for what is not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from keepkv.cli import build_parser, main
from keepkv.errors import KeepKVError
from keepkv.models import load
from keepkv.models.loading import parse_device, parse_dtype, slow_cpu_dtype_reason
from tests.conftest import TINY_VOCAB, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    write_tiny_tokenizer(folder)
    return folder


@pytest.mark.parametrize("name,allowed", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                          ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtypes(name, allowed):
    assert parse_dtype(name) == allowed


@pytest.mark.parametrize("bad", ["float64", "int8", torch.float64, "fp8"])
def test_bad_dtype_lists_the_allowed_ones(bad):
    with pytest.raises(KeepKVError, match="allowed: float32, bfloat16, float16"):
        parse_dtype(bad)


@pytest.mark.parametrize("dtype,avx512_bf16,amx,machine,slow", [
    (torch.bfloat16, False, False, "x86_64", True),
    (torch.bfloat16, True, False, "x86_64", False),
    (torch.bfloat16, False, True, "AMD64", False),
    (torch.bfloat16, False, False, "aarch64", False),  # torch.cpu's probes read x86 flags: no claim elsewhere
    (torch.float16, False, False, "x86_64", False),  # not measured: no claim
    (torch.float32, False, False, "x86_64", False),
])
def test_bfloat16_on_an_x86_cpu_without_its_instructions_is_flagged(monkeypatch, dtype, avx512_bf16, amx, machine,
                                                                      slow):
    """bfloat16 on an x86 CPU without AVX-512 BF16 and AMX gets a reason naming float32; nothing for other dtypes,
    other architectures, another device, or a torch whose probe is missing."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr("keepkv.models.loading.platform.machine", lambda: machine)
    reason = slow_cpu_dtype_reason(dtype, torch.device("cpu"))
    assert (reason is not None) == slow
    if slow:
        assert reason.startswith("bfloat16 on this CPU") and "dtype='float32'" in reason
    assert slow_cpu_dtype_reason(dtype, torch.device("meta")) is None
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert slow_cpu_dtype_reason(dtype, torch.device("cpu")) is None


@pytest.mark.parametrize("compile", [False, True])
def test_load_logs_the_slow_dtype_warning(tiny_folder, monkeypatch, caplog, compile):
    """load() keeps the asked dtype and logs the reason once, on the "keepkv" logger, compiled (the default) or
    eager."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr("keepkv.models.loading.platform.machine", lambda: "x86_64")
    with caplog.at_level("WARNING", logger="keepkv"):
        model = load(str(tiny_folder), dtype="bfloat16", device="cpu", compile=compile)
    assert model.dtype == torch.bfloat16
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "bfloat16 on this CPU" in r.getMessage()]
    assert len(warned) == 1 and warned[0].name.startswith("keepkv")


def test_unavailable_device_is_refused():
    bad = "cuda:7" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(KeepKVError, match="not available"):
        parse_device(bad)
    with pytest.raises(KeepKVError, match="not available"):
        parse_device("no-such-device")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(KeepKVError, match="Did you mean.*SmolLM2-135M"):
        load("SmolLM2-135", compile=False)


def test_prompt_checks(tiny_folder):
    model = load(tiny_folder, compile=False, device="cpu")
    with pytest.raises(KeepKVError, match="empty"):
        model.generate("   ")
    with pytest.raises(KeepKVError, match="context of 64 tokens"):
        model.generate(" ".join(["t5"] * 60), max_new_tokens=10)
    with pytest.raises(KeepKVError, match="max_new_tokens"):
        model.generate("t5 t6", max_new_tokens=0)
    with pytest.raises(KeepKVError, match=r"token ids must lie in \[0, 128\)"):
        model.logits(torch.tensor([[1, 500]]))


def test_batch_generation_and_stop_strings(tiny_folder):
    model = load(tiny_folder, compile=False, device="cpu")
    single = [model.generate(p, max_new_tokens=6) for p in ("t5 t6 t7", "t9")]
    assert model.generate(["t5 t6 t7", "t9"], max_new_tokens=6) == single
    first_word = single[0].split()[0] if single[0].split() else None
    if first_word:
        assert model.generate("t5 t6 t7", max_new_tokens=6, stop=[first_word]) == single[0][: single[0].find(first_word)]


def test_stream_concatenates_to_generate(tiny_folder):
    model = load(tiny_folder, compile=False, device="cpu")
    assert "".join(model.stream("t5 t6 t7", max_new_tokens=8)) == model.generate("t5 t6 t7", max_new_tokens=8)


def test_info_reports_cache_bytes_per_token(tiny_folder):
    info = load(tiny_folder, compile=False, device="cpu").info()
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # k+v, layers, kv heads, head_dim, fp32
    assert info["arch"] == "llama" and info["layers"] == 2


def test_cli_help_explains_every_option():
    parser = build_parser()
    for command in ("generate", "info", "download"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"keepkv {command} {action.option_strings} has no help"


def test_cli_generate_and_info(tiny_folder, capsys):
    assert main(["generate", str(tiny_folder), "--prompt", "t5 t6", "--max-new-tokens", "4", "--no-compile"]) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err
    assert main(["info", str(tiny_folder), "--json", "--no-compile"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == TINY_VOCAB


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    assert main(["generate", str(tmp_path / "model.bin"), "--prompt", "x", "--no-compile"]) == 2
    assert "safetensors or GGUF" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "keepkv.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("keepkv ")
