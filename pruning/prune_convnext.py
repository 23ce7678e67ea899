#!/usr/bin/env python
"""The pruning tool under its first name: `pruning/prune.py` (pruning/cli.py) serves every model family and
takes the same flags (see its --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from pruning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
