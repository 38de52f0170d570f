"""Registry names, ``resolve`` and the hub download, with no network: a fake hub cache and a loopback fake hub.

The fake hub (:class:`FakeHub`) is a threaded ``http.server`` on 127.0.0.1 that answers the four requests
``huggingface_hub.snapshot_download`` makes: repo info at a revision, the recursive file tree at a commit, and
HEAD / GET of ``/{repo}/resolve/{commit}/{file}`` with the ``ETag``, ``X-Repo-Commit`` and ``Content-Length``
headers. ``HF_ENDPOINT`` points at it; it is stopped when each test ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest

from keepkv import hub
from keepkv.cli import download as download_cli
from keepkv.errors import CheckpointError, KeepKVError
from keepkv.models import registry
from keepkv.models.config import SUPPORTED_ARCHITECTURES

REPO_ROOT = Path(__file__).resolve().parents[2]

REQUIRED_NAMES = [
    "Qwen2-7B",
    "Qwen2-7B-Instruct",
    "Qwen2.5-0.5B",
    "Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B",
    "Qwen2.5-1.5B-Instruct",
    "Qwen2.5-7B",
    "Qwen2.5-7B-Instruct",
    "Qwen2.5-Coder-0.5B-Instruct",
    "Meta-Llama-3-8B",
    "Meta-Llama-3-8B-Instruct",
    "Llama-3.1-8B",
    "Llama-3.1-8B-Instruct",
    "Llama-2-7b",
    "Mistral-7B-v0.1",
    "Mistral-7B-Instruct-v0.2",
    "Mistral-7B-v0.3",
    "Mistral-7B-Instruct-v0.3",
    "SmolLM2-135M",
    "SmolLM2-135M-Instruct",
    "SmolLM2-360M",
    "SmolLM2-360M-Instruct",
    "SmolLM2-1.7B",
    "SmolLM2-1.7B-Instruct",
    "TinyLlama-1.1B",
    "Mistral-SmolLM2-135M-Instruct-sw",
]


def commit_of(label: str) -> str:
    """A 40-hex-digit commit hash, as the hub uses."""
    return hashlib.sha1(label.encode()).hexdigest()


@pytest.fixture(autouse=True)
def private_keepkv_cache(tmp_path, monkeypatch):
    """Keep every test's verified markers and joined assets out of the user's keepkv cache."""
    monkeypatch.setenv("KEEPKV_CACHE", str(tmp_path / "keepkv-cache"))


# ------------------------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("name", REQUIRED_NAMES)
def test_required_names_are_registered(name):
    assert registry.get_model(name).name == name


def test_hub_repos_of_the_names_the_brief_fixes():
    assert registry.get_model("Llama-3.1-8B").hub_repo == "meta-llama/Llama-3.1-8B"
    assert registry.get_model("Llama-3.1-8B-Instruct").hub_repo == "meta-llama/Llama-3.1-8B-Instruct"
    assert registry.get_model("Llama-2-7b").hub_repo == "meta-llama/Llama-2-7b-hf"
    assert registry.get_model("TinyLlama-1.1B").hub_repo == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert registry.get_model("Qwen2-7B").hub_repo == "Qwen/Qwen2-7B"


def test_every_entry_is_well_formed():
    lowered = [name.lower() for name in registry.MODELS]
    assert len(lowered) == len(set(lowered))
    for name, entry in registry.MODELS.items():
        assert entry.name == name
        assert entry.arch in SUPPORTED_ARCHITECTURES
        assert entry.config_overrides.get("arch", entry.arch) == entry.arch
        assert entry.hub_repo.count("/") == 1
        if entry.offline_asset is not None:
            from keepkv.assets import OFFLINE_ASSETS

            assert entry.offline_asset in OFFLINE_ASSETS


@pytest.mark.parametrize(
    "query, expected",
    [
        ("qwen2-7b", "Qwen2-7B"),
        ("QWEN2.5-0.5B-INSTRUCT", "Qwen2.5-0.5B-Instruct"),
        ("Qwen/Qwen2-7B", "Qwen2-7B"),
        ("meta-llama/llama-3.1-8b-instruct", "Llama-3.1-8B-Instruct"),
        ("Llama-2-7b-hf", "Llama-2-7b"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1.1B"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("  mistral-7b-v0.1 ", "Mistral-7B-v0.1"),
    ],
)
def test_lookup_is_case_insensitive_and_takes_repo_ids(query, expected):
    assert registry.get_model(query).name == expected


def test_unknown_name_says_what_is_accepted_and_suggests():
    with pytest.raises(KeepKVError) as info:
        registry.get_model("Qwen2-8B")
    message = str(info.value)
    assert "Did you mean" in message and "Qwen2-7B" in message
    assert ".gguf" in message and "folder" in message and "known model name" in message


def test_sliding_window_variant_reuses_smollm2_weights():
    entry = registry.get_model("Mistral-SmolLM2-135M-Instruct-sw")
    smollm2 = registry.get_model("SmolLM2-135M-Instruct")
    assert entry.offline_asset == smollm2.offline_asset == "smollm2"
    assert entry.hub_repo == smollm2.hub_repo
    assert entry.config_overrides == {"arch": "mistral", "sliding_window": 1024}


# ------------------------------------------------------------------------------------------------------------
# resolve: paths


def test_resolve_hf_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    resolved = registry.resolve(tmp_path)
    assert (resolved.kind, resolved.path, resolved.entry) == ("hf_folder", tmp_path, None)
    assert resolved.config_overrides == {}
    assert registry.resolve(str(tmp_path)).kind == "hf_folder"


def test_resolve_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        registry.resolve(tmp_path)


def test_resolve_gguf_file(tmp_path):
    gguf = tmp_path / "Model.Q4_0.GGUF"
    gguf.write_bytes(b"GGUF")
    resolved = registry.resolve(str(gguf))
    assert (resolved.kind, resolved.path) == ("gguf", gguf)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_resolve_refuses_pickles(tmp_path, suffix):
    weights = tmp_path / f"pytorch_model{suffix}"
    weights.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="keepkv loads safetensors or GGUF only"):
        registry.resolve(weights)


def test_resolve_refuses_other_files(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a Hugging Face model folder nor a .gguf file"):
        registry.resolve(other)


@pytest.mark.parametrize("missing", ["./no-such-model.gguf", "/no/such/folder", "weights.bin"])
def test_resolve_missing_path_says_so(missing):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        registry.resolve(missing)


# ------------------------------------------------------------------------------------------------------------
# resolve: offline assets and the local hub cache


@pytest.fixture
def no_hub_download(monkeypatch):
    """Fail the test if anything tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected hub.download{args}")

    monkeypatch.setattr(registry.hub, "download", refuse)


def test_resolve_prefers_the_offline_asset(tmp_path, monkeypatch, no_hub_download):
    gguf = tmp_path / "asset.gguf"
    gguf.write_bytes(b"GGUF")
    asked = []
    monkeypatch.setattr(registry.assets, "offline_asset_path", lambda name: asked.append(name) or gguf)
    resolved = registry.resolve("mistral-smollm2-135m-instruct-sw")
    assert (resolved.kind, resolved.path) == ("gguf", gguf)
    assert resolved.config_overrides == {"arch": "mistral", "sliding_window": 1024}
    assert resolved.entry.name == "Mistral-SmolLM2-135M-Instruct-sw"
    assert registry.resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct").kind == "gguf"
    assert asked == ["smollm2", "qwen2.5-coder"]


def make_cached_snapshot(
    cache: Path, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",), files: dict[str, bytes] | None = None
) -> Path:
    """Lay out ``repo_id`` at ``commit`` the way the huggingface_hub cache does; return the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in (files or {"config.json": b"{}", "model.safetensors": b"weights"}).items():
        (snapshot / name).write_bytes(content)
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub uses by default (as if HF_HUB_CACHE pointed at it)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_resolve_finds_the_local_hub_cache_offline(hub_cache, monkeypatch, no_hub_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = make_cached_snapshot(hub_cache, "Qwen/Qwen2.5-0.5B", commit_of("main"))
    tagged = make_cached_snapshot(hub_cache, "Qwen/Qwen2.5-0.5B", commit_of("v1"), refs=("v1",))
    resolved = registry.resolve("qwen2.5-0.5b")
    assert (resolved.kind, resolved.path, resolved.entry.name) == ("hf_folder", main, "Qwen2.5-0.5B")
    assert registry.resolve("Qwen/Qwen2.5-0.5B", revision="v1").path == tagged
    assert registry.resolve("Qwen2.5-0.5B", revision=commit_of("v1")).path == tagged


def test_resolve_with_explicit_cache_dir_and_local_files_only(tmp_path, no_hub_download):
    snapshot = make_cached_snapshot(tmp_path, "mistralai/Mistral-7B-v0.1", commit_of("m"))
    resolved = registry.resolve("Mistral-7B-v0.1", cache_dir=tmp_path, local_files_only=True)
    assert resolved.path == snapshot


def test_resolve_uses_the_cache_when_the_offline_asset_is_not_installed(hub_cache, monkeypatch, no_hub_download):
    monkeypatch.setattr(registry.assets, "offline_asset_path", lambda name: None)
    snapshot = make_cached_snapshot(hub_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", commit_of("s"))
    resolved = registry.resolve("SmolLM2-135M-Instruct", local_files_only=True)
    assert (resolved.kind, resolved.path) == ("hf_folder", snapshot)


def test_pinned_revision_skips_the_offline_asset(hub_cache, monkeypatch, no_hub_download):
    monkeypatch.setattr(registry.assets, "offline_asset_path", lambda name: pytest.fail("asset consulted"))
    snapshot = make_cached_snapshot(hub_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", commit_of("r"), refs=("r1",))
    assert registry.resolve("SmolLM2-135M-Instruct", revision="r1", local_files_only=True).path == snapshot


def test_cached_snapshot_without_safetensors_does_not_count(hub_cache):
    make_cached_snapshot(hub_cache, "Qwen/Qwen2-7B", commit_of("q"), files={"config.json": b"{}"})
    assert hub.cached_snapshot("Qwen/Qwen2-7B") is None
    assert hub.cached_snapshot("Qwen/Qwen2-7B-Instruct") is None


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_with_empty_cache_gives_the_clear_error(hub_cache, monkeypatch, how):
    monkeypatch.setattr(registry.assets, "offline_asset_path", lambda name: None)
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KeepKVError) as info:
        registry.resolve("Llama-3.1-8B", revision="v2", local_files_only=True if how == "argument" else None)
    message = str(info.value)
    expected = ("meta-llama/Llama-3.1-8B", "revision v2", "not in the local hub cache", "keepkv download", ".gguf")
    assert all(part in message for part in expected), message


# ------------------------------------------------------------------------------------------------------------
# The fake hub on 127.0.0.1


@dataclass
class FakeRepo:
    """A hub repo: ``refs`` maps branch/tag names to commits, ``files`` each commit to its files."""

    refs: dict[str, str]
    files: dict[str, dict[str, bytes]]
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""


class FakeHubHandler(BaseHTTPRequestHandler):
    """Answers huggingface_hub's repo-info, tree and resolve requests from ``self.server.fake_hub``."""

    timeout = 10

    def log_message(self, format, *args):  # silence the default stderr log
        pass

    def do_GET(self):
        self._answer(send_body=True)

    def do_HEAD(self):
        self._answer(send_body=False)

    def _send(self, status, headers, body=b"", send_body=True):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status, code, send_body):
        body = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "Content-Type": "application/json", "Content-Length": str(len(body))}
        self._send(status, headers, body, send_body)

    def _json(self, payload, send_body):
        body = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body, send_body)

    def _answer(self, send_body):
        fake: FakeHub = self.server.fake_hub
        path = urlsplit(self.path).path
        fake.requests.append((self.command, unquote(path)))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        repo = fake.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", send_body)
        if repo.gated:
            return self._error(403, "GatedRepo", send_body)
        if api and len(parts) == 6 and parts[4] == "revision":
            revision = parts[5]
            commit = repo.refs.get(revision, revision if revision in repo.files else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", send_body)
            siblings = [{"rfilename": name} for name in repo.files[commit]]
            return self._json({"id": repo_id, "sha": commit, "siblings": siblings, "private": False}, send_body)
        if api and len(parts) >= 6 and parts[4] == "tree":
            files = repo.files[parts[5]]
            tree = [
                {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                for name, content in files.items()
            ]
            return self._json(tree, send_body)
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            commit, filename = parts[3], "/".join(parts[4:])
            content = repo.files.get(commit, {}).get(filename)
            if content is None:
                return self._error(404, "EntryNotFound", send_body)
            headers = {
                "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                "X-Repo-Commit": commit,
                "Content-Length": str(len(content)),
                "Content-Type": "application/octet-stream",
            }
            return self._send(200, headers, content, send_body)
        return self._error(404, "EntryNotFound", send_body)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, hub_cache):
    """A running fake hub on 127.0.0.1 that ``HF_ENDPOINT`` points at; stopped after the test."""
    fake = FakeHub(repos={})
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.daemon_threads = True
    server.fake_hub = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_loopback_tests")
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


FULL_REPO_FILES = {
    "config.json": b'{"model_type": "qwen2"}',
    "generation_config.json": b'{"do_sample": false}',
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b'{"model_max_length": 32768}',
    "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}',
    "model-00001-of-00002.safetensors": b"shard one",
    "model-00002-of-00002.safetensors": b"shard two",
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "pytorch_model.bin": b"pickle weights",
    "pytorch_model.bin.index.json": b"{}",
    "README.md": b"# readme",
    ".gitattributes": b"*.bin filter=lfs",
    "original/consolidated.00.pth": b"pickle",
    "onnx/model.onnx": b"onnx",
}
ALLOWED_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}


def test_download_fetches_only_allowed_files_at_the_pinned_revision(fake_hub, hub_cache):
    main, tagged = commit_of("main"), commit_of("v2")
    tagged_files = {**FULL_REPO_FILES, "config.json": b'{"model_type": "qwen2", "tag": "v2"}'}
    fake_hub.repos["Qwen/Qwen2.5-0.5B"] = FakeRepo(
        {"main": main, "v2": tagged}, {main: FULL_REPO_FILES, tagged: tagged_files}
    )

    folder = hub.download("Qwen/Qwen2.5-0.5B", revision="v2")

    assert folder.name == tagged and folder.is_relative_to(hub_cache)
    assert files_under(folder) == ALLOWED_FILES
    assert (folder / "config.json").read_bytes() == tagged_files["config.json"]
    assert ("GET", "/api/models/Qwen/Qwen2.5-0.5B/revision/v2") in fake_hub.requests
    # Each file's content is distinct, so none is skipped as an already cached blob: every allowed file is
    # fetched, nothing else is asked for, and only at the pinned commit.
    prefix = f"/Qwen/Qwen2.5-0.5B/resolve/{tagged}/"
    resolved_paths = [(method, path) for method, path in fake_hub.requests if "/resolve/" in path]
    assert all(path.startswith(prefix) for _, path in resolved_paths)
    assert {path[len(prefix) :] for method, path in resolved_paths if method == "GET"} == ALLOWED_FILES
    assert {path[len(prefix) :] for _, path in resolved_paths} == ALLOWED_FILES
    assert not any(main in path for _, path in fake_hub.requests)

    # Then the same revision resolves from the cache with the hub gone.
    fake_hub.repos.clear()
    assert hub.cached_snapshot("Qwen/Qwen2.5-0.5B", revision="v2") == folder


def test_download_to_local_dir(fake_hub, tmp_path):
    commit = commit_of("local")
    fake_hub.repos["HuggingFaceTB/SmolLM2-360M"] = FakeRepo({"main": commit}, {commit: FULL_REPO_FILES})
    target = tmp_path / "smollm2-360m"
    folder = hub.download("HuggingFaceTB/SmolLM2-360M", local_dir=target)
    assert folder == target.resolve()
    assert files_under(folder) == ALLOWED_FILES


def test_resolve_downloads_a_known_name_missing_from_the_cache(fake_hub, hub_cache):
    commit = commit_of("tiny")
    fake_hub.repos["TinyLlama/TinyLlama-1.1B-Chat-v1.0"] = FakeRepo({"main": commit}, {commit: FULL_REPO_FILES})
    resolved = registry.resolve("tinyllama-1.1b")
    assert (resolved.kind, resolved.path.name, resolved.entry.name) == ("hf_folder", commit, "TinyLlama-1.1B")
    requests_before = len(fake_hub.requests)
    assert registry.resolve("TinyLlama-1.1B").path == resolved.path
    assert len(fake_hub.requests) == requests_before, "a cached model must resolve without asking the hub"


def test_gated_repo_error_explains_license_and_token(fake_hub):
    fake_hub.repos["meta-llama/Llama-3.1-8B"] = FakeRepo({}, {}, gated=True)
    with pytest.raises(KeepKVError) as info:
        hub.download("meta-llama/Llama-3.1-8B")
    message = str(info.value)
    assert "gated" in message and "license" in message and "HF_TOKEN" in message
    assert "https://huggingface.co/meta-llama/Llama-3.1-8B" in message


def test_unknown_revision_and_unknown_repo(fake_hub):
    commit = commit_of("x")
    fake_hub.repos["Qwen/Qwen2-7B"] = FakeRepo({"main": commit}, {commit: FULL_REPO_FILES})
    with pytest.raises(KeepKVError, match="revision 'nope' does not exist in Qwen/Qwen2-7B"):
        hub.download("Qwen/Qwen2-7B", revision="nope")
    with pytest.raises(KeepKVError, match="Qwen/Nothing-1B was not found on the hub"):
        hub.download("Qwen/Nothing-1B")


def test_pickle_only_repo_is_refused(fake_hub):
    commit = commit_of("pickles")
    files = {name: content for name, content in FULL_REPO_FILES.items() if "safetensors" not in name}
    fake_hub.repos["org/pickle-only"] = FakeRepo({"main": commit}, {commit: files})
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights.*pickled .bin"):
        hub.download("org/pickle-only")
    assert not any(path.endswith(".bin") for _, path in fake_hub.requests)


def test_unreachable_hub_gives_the_clear_error(hub_cache, monkeypatch):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(KeepKVError) as info:
        hub.download("Qwen/Qwen2-7B-Instruct", revision="main")
    message = str(info.value)
    assert "Qwen/Qwen2-7B-Instruct (revision main)" in message
    assert "hub cannot be reached" in message and "keepkv download" in message


# ------------------------------------------------------------------------------------------------------------
# The download command


def parse_download_args(*argv: str) -> argparse.Namespace:
    return download_cli.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_run_download_passes_name_revision_and_local_dir(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(download_cli.hub, "download", lambda repo, **kw: calls.append((repo, kw)) or tmp_path)
    assert download_cli.run(parse_download_args("llama-2-7b", "--revision", "abc", "--local-dir", "out")) == 0
    assert calls == [("meta-llama/Llama-2-7b-hf", {"revision": "abc", "local_dir": "out", "cache_dir": None})]
    assert str(tmp_path) in capsys.readouterr().out


def test_run_download_offline_assets_and_list(monkeypatch, capsys, tmp_path):
    installed = []
    monkeypatch.setattr(
        download_cli.assets, "offline_asset_path", lambda name, install: installed.append((name, install)) or tmp_path
    )
    download_cli.run(parse_download_args("--offline-assets"))
    download_cli.run(parse_download_args("--offline-assets", "smollm2"))
    assert installed == [("smollm2", True), ("qwen2.5-coder", True), ("smollm2", True)]
    download_cli.run(parse_download_args("--list"))
    listing = capsys.readouterr().out
    assert all(name in listing for name in REQUIRED_NAMES)
    with pytest.raises(KeepKVError, match="nothing to download"):
        download_cli.run(parse_download_args())


def test_tools_download_script_reports_errors_plainly():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "download.py"), "Qwen2-8B"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT / "tests",
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: unknown model 'Qwen2-8B'") and "Traceback" not in completed.stderr


def test_download_command_parses_and_runs_a_model_download(monkeypatch, tmp_path):
    parser = download_cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["Qwen2.5-7B", "--revision", "v1"])
    seen = {}

    def fake_download(repo, **kw):
        seen.update(repo=repo, **kw)
        return tmp_path

    monkeypatch.setattr(download_cli.hub, "download", fake_download)
    assert download_cli.run(args) == 0
    assert seen["repo"] == "Qwen/Qwen2.5-7B" and seen["revision"] == "v1"
