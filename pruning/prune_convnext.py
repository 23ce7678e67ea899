#!/usr/bin/env python
"""`python pruning/prune_convnext.py ...`: the first name of pruning/prune.py (same flags, every family)."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prune.py"), run_name="__main__")
