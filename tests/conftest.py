"""Fixtures several test files share."""
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, ROOT, TRAINED_MODEL, TRAINED_RECIPE  # noqa: F401 (TRAINED_*: test files import them from here)


TIERS = ("unit", "cli", "e2e", "cuda")


def pytest_collection_modifyitems(items):
    """A test without a tier marker is a unit test (pytest.ini lists the tiers). The e2e tier
    runs first: its long tests then overlap the many short ones instead of ending the run alone."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


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


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small ConvNeXt checkpoint that says it was trained on DIGITS at 32 px (the studies'
    and the reliability tests' source; a module may define its own `source`)."""
    import models
    from checkpoints.io import save_checkpoint_file
    torch.manual_seed(0)
    arch = {"family": "convnext", "depths": [1, 1], "dims": [16, 32], "num_classes": 10}
    model = models.build_model(arch, layer_scale_init_value=0.5)
    path = tmp_path_factory.mktemp("src") / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"data_set": "DIGITS", "input_size": 32}}, path)
    return path


def randomised(arch, seed=0):
    """A model of `arch` in eval mode with every parameter and BatchNorm statistic away from its
    init (layer scale included)."""
    import models
    torch.manual_seed(seed)
    model = models.build_model(arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model
