#!/usr/bin/env python
"""`python scripts/benchmark.py ...`: throughput and latency per runtime, --vs ratios timed alternately (cli/benchmark.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.benchmark", run_name="__main__", alter_sys=True)
