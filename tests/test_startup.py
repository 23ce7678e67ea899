"""Every command line answers --help and a bad flag without importing torch (a stand-in
`torch` package that refuses to import comes first on the path)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ["main.py", "run_with_submitit.py", "pruning/prune.py", "pruning/prune_convnext.py",
        "pruning/diagnose.py", "pruning/sensitivity.py", "pruning/iterative.py",
        "scripts/benchmark.py", "scripts/bench_engine.py", "scripts/bench_pruning.py",
        "scripts/compare_criteria.py", "scripts/demo.py", "scripts/export.py", "scripts/inference.py",
        "scripts/model_zoo.py", "scripts/reproduce.py"]


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """An environment in which `import torch` (and so timm, torchvision) fails."""
    folder = tmp_path_factory.mktemp("blocked")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text('raise ImportError("torch is blocked in this test")\n')
    return {**os.environ, "PYTHONPATH": str(folder)}


def run(script, flag, env):
    return subprocess.run([sys.executable, script, flag], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.e2e
def test_the_blocker_blocks(no_torch):
    res = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True)
    assert res.returncode == 1 and "torch is blocked" in res.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("script", CLIS)
def test_help_and_a_bad_flag_need_no_torch(script, no_torch):
    res = run(script, "--help", no_torch)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage:") and res.stderr == ""
    res = run(script, "--no_such_flag", no_torch)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "no_such_flag" in lines[0] or "arguments are required" in lines[0]
