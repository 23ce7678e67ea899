#!/usr/bin/env python
"""`python scripts/inference.py ...`: classify images with a checkpoint or an exported graph (cli/inference.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.inference", run_name="__main__", alter_sys=True)
