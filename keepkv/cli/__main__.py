"""``python -m keepkv.cli ...``: the same as ``keepkv ...`` and ``python -m keepkv ...``."""

import sys

from keepkv.cli import main

if __name__ == "__main__":
    sys.exit(main())
