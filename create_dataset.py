"""The seed's `python3 create_dataset.py ...` command line; the same as `prefixcap preprocess ...`."""

import sys

from prefixcap.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="create_dataset.py"))
