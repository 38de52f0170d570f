"""``python -m keepkv ...`` (and ``torchrun ... -m keepkv ...``): the ``keepkv`` command line."""

import sys

from keepkv.cli import main

if __name__ == "__main__":
    sys.exit(main())
