#!/usr/bin/env python
"""`python pruning/sensitivity.py ...`: prune one group at a time, fine-tune, and plot accuracy against the ratio (cli/sensitivity.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.sensitivity", run_name="__main__", alter_sys=True)
