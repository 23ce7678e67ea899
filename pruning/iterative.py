#!/usr/bin/env python
"""`python pruning/iterative.py ...`: prune and fine-tune in rounds (cli/iterative.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.iterative", run_name="__main__", alter_sys=True)
