#!/usr/bin/env python3
"""The seed's training command: `python3 train.py [flags]` is `prefixcap train [flags]`."""

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from prefixcap.train.cli import main
    except ImportError:  # run from a checkout that was not pip-installed
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
        from prefixcap.train.cli import main
    sys.exit(main())
