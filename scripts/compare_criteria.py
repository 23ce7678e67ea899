#!/usr/bin/env python
"""`python scripts/compare_criteria.py ...`: criteria x budgets x seeds, fine-tuned, with statistics (cli/compare_criteria.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.compare_criteria", run_name="__main__", alter_sys=True)
