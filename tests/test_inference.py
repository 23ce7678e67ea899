"""scripts/inference.py end to end on tiny checkpoints and a PNG the tests write."""
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

import models
from checkpoints.io import save_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "inference.py")
TINY_ARCH = {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32],
             "hidden": [[16], [32], [48], [64]], "dw": "standard", "dw_branches": None,
             "num_classes": 10, "in_chans": 3}
LINE = re.compile(r"^(.+?) +\((\d+\.\d\d)%\)$")


def load_script():
    from cli import inference
    return inference


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "digit.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(TINY_ARCH)
    path = tmp_path / "checkpoint-best.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "epoch": 3,
                          "args": {"data_set": "DIGITS", "input_size": 32, "crop_pct": None}}, path)
    return path


def top_lines(stdout):
    """(name, percent) pairs of the result lines; each starts at column 0, '(' at column 77."""
    rows = [line for line in stdout.splitlines() if LINE.match(line)]
    assert all(line.index("(") == 76 for line in rows)
    return [(LINE.match(r).group(1), float(LINE.match(r).group(2))) for r in rows]


@pytest.mark.e2e
def test_top5_from_a_training_checkpoint(tiny_checkpoint, image):
    proc = subprocess.run([sys.executable, SCRIPT, "--image", str(image), "--checkpoint",
                           str(tiny_checkpoint)], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model successfully" in proc.stdout and "weights" in proc.stdout
    rows = top_lines(proc.stdout)
    assert len(rows) == 5
    names, percents = zip(*rows)
    assert set(names) <= {str(i) for i in range(10)} and len(set(names)) == 5  # DIGITS names
    assert list(percents) == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.01


@pytest.mark.cli
def test_state_dict_only_with_class_file(tmp_path, image, capsys):
    """No arch in the file: the shape comes from the weights; names from --class_names."""
    model = models.build_model(TINY_ARCH)
    ckpt = tmp_path / "weights.pth"
    save_checkpoint_file(model.state_dict(), ckpt)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing number {i}\n" for i in range(10)))
    load_script().main(["--image", str(image), "--checkpoint", str(ckpt), "--class_names", str(names)])
    rows = top_lines(capsys.readouterr().out)
    assert len(rows) == 5 and all(n.startswith("thing number ") for n, _ in rows)


@pytest.mark.cli
def test_timm_model_by_name(tmp_path, image, capsys):
    """timm's test_convnext (our keys in timm's layout, other norms) is refused unless --model
    names it; then timm builds it."""
    model = timm.create_model("test_convnext", num_classes=3)
    ckpt = tmp_path / "timm.pth"
    save_checkpoint_file({"model": model.state_dict()}, ckpt)
    script = load_script()
    assert script.main(["--image", str(image), "--checkpoint", str(ckpt)]) == 2
    assert "give --model test_convnext" in capsys.readouterr().err
    script.main(["--image", str(image), "--checkpoint", str(ckpt), "--model", "test_convnext",
                 "--input_size", "64"])
    rows = top_lines(capsys.readouterr().out)
    assert [n for n, _ in rows] and len(rows) == 3  # only 3 classes: top-3
    assert all(n.startswith("class ") for n, _ in rows)


@pytest.mark.e2e
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_checkpoint, image):
    proc = subprocess.run([sys.executable, SCRIPT, "--image", str(tmp_path / "missing.png"),
                           "--checkpoint", str(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: image not found: {tmp_path / 'missing.png'}"


@pytest.mark.cli
@pytest.mark.parametrize("case", ["checkpoint", "names", "image", "data_set", "nan", "size", "small"])
def test_bad_inputs(tmp_path, tiny_checkpoint, image, capsys, case):
    args = ["--image", str(image), "--checkpoint", str(tiny_checkpoint)]
    expected = {"checkpoint": "checkpoint not found",
                "names": "3 class names given but the model has 10",
                "image": "cannot read image", "data_set": "CIFAR10: no data set under",
                "nan": "NaN or infinite values", "size": "--input_size must be >= 1, got -5",
                "small": "--input_size 16 is too small"}[case]
    if case == "checkpoint":
        args[3] = str(tmp_path / "none.pth")
    elif case == "nan":
        ckpt = torch.load(tiny_checkpoint, weights_only=True)
        ckpt["model"]["head.bias"][0] = float("nan")
        save_checkpoint_file(ckpt, tmp_path / "nan.pth")
        args[3] = str(tmp_path / "nan.pth")
    elif case in ("size", "small"):
        args += ["--input_size", "-5" if case == "size" else "16"]
    elif case == "names":
        (tmp_path / "n.txt").write_text("a\nb\nc\n")
        args += ["--class_names", str(tmp_path / "n.txt")]
    elif case == "image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        args[1] = str(tmp_path / "bad.png")
    else:
        args += ["--data_set", "CIFAR10", "--data_path", str(tmp_path)]
    assert load_script().main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
