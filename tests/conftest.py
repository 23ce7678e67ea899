"""Fixtures several test files share."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED_MODEL = "convnext_tiny_3M_pruned_cifar10"
TRAINED_RECIPE = ["--data_set", "DIGITS", "--num_workers", "0", "--device", "cpu", "--input_size", "32",
                  "--batch_size", "128", "--warmup_epochs", "0", "--aa", "none", "--reprob", "0",
                  "--mixup", "0", "--cutmix", "0"]
# One intra-op thread: on a busy 2-core machine, two spinning threads per process are far slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def _trained_once(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_once") / "out"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", TRAINED_MODEL, "--epochs", "1",
           "--output_dir", str(out), *TRAINED_RECIPE]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def trained(_trained_once, tmp_path_factory):
    """(run folder, its main.py process): one real epoch of the 3M Efficient ConvNeXt on DIGITS
    at 32 px (TRAINED_RECIPE), trained once per session; each test module gets its own copy
    of the folder, so a module that trains on in it changes no other module's."""
    out, proc = _trained_once
    copy = tmp_path_factory.mktemp("trained") / "out"
    shutil.copytree(out, copy)
    return copy, proc
