#!/usr/bin/env python
"""`python pruning/diagnose.py ...`: why a criterion keeps what it keeps, per group (cli/diagnose.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.diagnose", run_name="__main__", alter_sys=True)
