"""``python -m qsmnet``: the same command line as the ``qsmnet`` console script."""

import sys

from qsmnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
