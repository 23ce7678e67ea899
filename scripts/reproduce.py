#!/usr/bin/env python
"""`python scripts/reproduce.py ...`: the seeds' recipes in one command (cli/reproduce.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.reproduce", run_name="__main__", alter_sys=True)
