"""``python -m portable_cnn``: the same command as ``portable-cnn``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
