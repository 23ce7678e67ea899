#!/usr/bin/env python
"""`python pruning/prune.py ...`: the pruning command line (pruning/cli.py; --help lists the
flags). In Python, call `pruning.prune(source, spec)` or `pruning.cli.main(argv)`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from pruning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
