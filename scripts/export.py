#!/usr/bin/env python
"""`python scripts/export.py ...`: ONNX, int8 or a timm folder, checked against PyTorch (cli/export.py; --help lists the flags)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
runpy.run_module("cli.export", run_name="__main__", alter_sys=True)
