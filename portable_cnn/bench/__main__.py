"""``python -m portable_cnn.bench [options]``: the same as ``portable-cnn bench``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
