"""``python -m lightning_lvp ...`` (see lightning_lvp/cli.py)."""

import sys

from lightning_lvp.cli import main

if __name__ == "__main__":
    sys.exit(main())
