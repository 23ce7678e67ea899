#!/usr/bin/env python
"""`python pruning/prune.py ...`: prune a checkpoint into a smaller dense model; in Python: `pruning.prune(source, spec)` (cli/prune.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.prune", run_name="__main__", alter_sys=True)
