"""``keepkv info MODEL``: a model's shape, parameters and KV-cache bytes per token; ``keepkv info --list`` (or no
MODEL): the known model names (:func:`list_models`, also ``keepkv download --list``)."""

from __future__ import annotations

import argparse
import json

from keepkv.cli.common import add_model_arguments, load_model


def add_parser(commands) -> None:
    info = commands.add_parser("info", help="model shape, parameters and KV-cache bytes per token",
                               description="Print a model's shape and cache cost, or list known models.")
    add_model_arguments(info, model_required=False)
    info.add_argument("--list", action="store_true", help="list the known model names and exit")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run)


def list_models() -> str:
    """A table of the known models: name, hub repo, architecture, offline availability, notes."""
    from keepkv import assets
    from keepkv.models import registry

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


def run(args: argparse.Namespace) -> int:
    if args.list or args.model is None:
        print(list_models())
        return 0
    model = load_model(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:32s} {value}")
    return 0
