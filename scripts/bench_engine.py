#!/usr/bin/env python
"""`python scripts/bench_engine.py ...`: engine.train_one_epoch against a bare PyTorch loop (cli/bench_engine.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.bench_engine", run_name="__main__", alter_sys=True)
