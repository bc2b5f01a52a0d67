"""`python -m sddit ...`: the same program as the `sddit` command."""

import sys

from sddit.cli import main

if __name__ == "__main__":
    sys.exit(main())
