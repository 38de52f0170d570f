"""Logging (``--verbose`` / ``--quiet``), progress bars, and hub repo ids loaded by their ``config.json``.

No network and no real model: a tiny random llama / qwen2 written to disk, and a fake
``huggingface_hub.snapshot_download`` that serves it as a hub repo (copying only the files the patterns allow).
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors
import pytest
import torch

from keepkv import logs
from keepkv.cli import download as download_cli
from keepkv.cli import main
from keepkv.errors import KeepKVError
from keepkv.generate import GenerationEngine
from keepkv.models import load
from tests.conftest import tiny_config, tiny_network, write_tiny_tokenizer
from tests.models.test_checkpoint import random_state, write_hf_folder, write_tiny_gguf


def tiny_checkpoint(folder: Path, arch: str = "llama") -> Path:
    """A loadable Hugging Face folder: config.json, model.safetensors (random), tokenizer.json + config."""
    config = tiny_config(arch, max_position_embeddings=256)
    write_hf_folder(folder, config, random_state(config))
    write_tiny_tokenizer(folder)
    return folder


class FakeTTY(io.StringIO):
    """Standard error as a terminal (progress bars are drawn only on one)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_keepkv_logger():
    """``main()`` configures the "keepkv" logger; put it back as a library leaves it."""
    logger = logs.logger
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


# ---- logging -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quiet_silences_info_and_verbose_shows_debug(tiny_folder, capsys):
    args = ("generate", str(tiny_folder), "--no-compile", "--max-new-tokens", "3", "--prompt", "t5 t6 t7")
    code, out, normal = run_cli(capsys, *args)
    assert code == 0 and out.strip()  # the generated text, on stdout only
    assert "[keepkv] loaded LanguageModel(" in normal and "[keepkv] prompt 3 tokens" in normal
    assert "resolved" not in normal  # a debug message
    code, quiet_out, quiet = run_cli(capsys, "--quiet", *args)
    assert code == 0 and quiet_out == out and quiet == ""
    code, verbose_out, verbose = run_cli(capsys, *args, "--verbose")  # after the command works too
    assert code == 0 and verbose_out == out
    assert f"[keepkv] resolved {tiny_folder} -> hf_folder" in verbose and "[keepkv] loaded" in verbose


def test_verbose_and_quiet_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-v", "-q", "info", "--list"])
    assert exit_info.value.code == 2 and "--verbose and --quiet" in capsys.readouterr().err


def test_library_logging_stays_silent_without_configuration(tiny_folder, capsys):
    """As a library keepkv adds only a NullHandler: nothing reaches stderr unless the application asks."""
    load(tiny_folder, compile=False).generate("t5", max_new_tokens=2)
    assert capsys.readouterr().err == ""


# ---- progress bars -------------------------------------------------------------------------------------------
def test_progress_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr("sys.stderr", io.StringIO())
    logs.configure_cli_logging("normal")
    assert logs.progress(items) is items  # not a terminal
    monkeypatch.setattr("sys.stderr", FakeTTY())
    bar = logs.progress(items, desc="work")
    assert bar is not items and list(bar) == items
    assert logs.progress(items, min_total=4) is items  # too short to bother
    logs.configure_cli_logging("quiet")
    assert logs.progress(items) is items


def test_gguf_dequantisation_and_long_prefill_draw_bars(tmp_path, monkeypatch):
    config = tiny_config("llama")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, random_state(config))
    terminal = FakeTTY()
    monkeypatch.setattr("sys.stderr", terminal)
    logs.configure_cli_logging("normal")
    from keepkv.models.checkpoint import load_gguf

    load_gguf(path, torch.float32, "cpu")
    assert "dequantising tiny.gguf" in terminal.getvalue()
    engine = GenerationEngine(tiny_network(), compile=False, prefill_chunk_size=4)
    prompt = torch.arange(3, 3 + 4 * logs.PREFILL_PROGRESS_MIN_CHUNKS)[None]
    engine.prepare_caches(1, prompt.shape[1], 0)
    with torch.inference_mode():
        engine.prefill(prompt, torch.ones_like(prompt, dtype=torch.bool))
    assert "prefill" in terminal.getvalue()
    logs.configure_cli_logging("quiet")
    before = terminal.getvalue()
    load_gguf(path, torch.float32, "cpu")
    assert terminal.getvalue() == before


# ---- hub repo ids by config.json -----------------------------------------------------------------------------
class FakeSnapshotDownload:
    """``huggingface_hub.snapshot_download`` over ``repos`` (repo id -> folder): copies the files matching
    ``allow_patterns`` into ``root / repo`` and returns it; ``local_files_only`` serves only what was copied."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos, self.calls = root, repos, []

    def __call__(self, repo_id, *, revision=None, local_dir=None, cache_dir=None, token=None,
                 local_files_only=False, allow_patterns=None, endpoint=None, **_):
        self.calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
        target = Path(local_dir) if local_dir else self.root / repo_id.replace("/", "--")
        wanted = [name for name in (p.name for p in self.repos[repo_id].iterdir())
                  if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns or ["*"])]
        if local_files_only:
            if not target.is_dir() or not all((target / name).is_file() for name in wanted):
                raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not cached")
            return str(target)
        target.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            shutil.copy(self.repos[repo_id] / name, target / name)
        return str(target)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    repos = {"someorg/tiny-llama": tiny_checkpoint(remote / "llama"),
             "otherorg/tiny-qwen": tiny_checkpoint(remote / "qwen", "qwen2")}
    gpt2 = tiny_checkpoint(remote / "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    repos["someorg/tiny-gpt2"] = gpt2
    fake = FakeSnapshotDownload(tmp_path / "cache", repos)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return fake


@pytest.mark.parametrize("repo_id", ["someorg/tiny-llama", "otherorg/tiny-qwen"])
def test_any_hub_repo_of_a_supported_architecture_loads(fake_hub, repo_id, monkeypatch):
    model = load(repo_id, compile=False)
    assert model.name == repo_id and model.config.arch == ("llama" if "llama" in repo_id else "qwen2")
    assert model.generate("t5 t6", max_new_tokens=2) == load(fake_hub.repos[repo_id], compile=False).generate(
        "t5 t6", max_new_tokens=2)
    cached, config_only, weights = fake_hub.calls
    assert cached[2] and config_only == (repo_id, ("config.json",), False)  # config first, alone
    assert "*.safetensors" in weights[1] and not weights[2]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now from the cache, no download
    fake_hub.calls.clear()
    assert load(repo_id, compile=False).name == repo_id
    assert all(local for _, _, local in fake_hub.calls)


def test_unsupported_architecture_is_refused_before_any_weight(fake_hub):
    with pytest.raises(KeepKVError, match=r"someorg/tiny-gpt2 is a model_type 'gpt2' \(GPT2LMHeadModel\) model; "
                                          r"keepkv runs .* llama, mistral, qwen2"):
        load("someorg/tiny-gpt2", compile=False)
    downloads = [patterns for _, patterns, local_only in fake_hub.calls if not local_only]
    assert downloads == [("config.json",)]  # the cache was consulted, then config.json alone fetched


def test_download_command_takes_any_repo_id(fake_hub, tmp_path, capsys):
    parser = download_cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["otherorg/tiny-qwen", "--local-dir", str(tmp_path / "here")])
    assert download_cli.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "here")
    assert {p.name for p in (tmp_path / "here").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    with pytest.raises(KeepKVError, match="gpt2"):
        download_cli.run(parser.parse_args(["someorg/tiny-gpt2", "--local-dir", str(tmp_path / "no")]))


def test_unknown_plain_names_still_get_suggestions():
    with pytest.raises(KeepKVError, match="unknown model 'SmolLM2-135'.*Did you mean"):
        load("SmolLM2-135", compile=False)
