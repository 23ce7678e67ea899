"""Knowledge distillation: the loss against an independent computation, main.py --teacher end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from checkpoints.io import save_checkpoint_file
from training.losses import DistillationLoss
from helpers import ROOT

STUDENT = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
TEACHERS = [np.array([[1.0, 0.0, -1.0], [0.5, 2.5, 0.0]]), np.array([[-0.5, 1.5, 0.2], [1.0, 1.0, 1.0]])]
LABELS = np.array([0, 2])


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected(teachers, alpha, t):
    p_s = softmax(STUDENT)
    ce = -np.log(p_s[np.arange(2), LABELS]).mean()
    kls = []
    for logits in teachers:
        p, q = softmax(logits / t), softmax(STUDENT / t)
        kls.append(t * t * (p * (np.log(p) - np.log(q))).sum(axis=1).mean())
    return (1 - alpha) * ce + alpha * np.mean(kls), ce, np.mean(kls)


@pytest.mark.parametrize("n_teachers", [1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_equals_an_independent_computation(n_teachers, alpha):
    teachers = [Fixed(t) for t in TEACHERS[:n_teachers]]
    loss_fn = DistillationLoss(torch.nn.CrossEntropyLoss(), teachers, temperature=5.0, alpha=alpha)
    student = torch.tensor(STUDENT, dtype=torch.float32, requires_grad=True)
    loss, parts = loss_fn(torch.zeros(2, 3, 4, 4), student, torch.tensor(LABELS))
    want, ce, kd = expected(TEACHERS[:n_teachers], alpha, 5.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["loss_kd"].item() == pytest.approx(kd, rel=1e-5)
    loss.backward()  # the gradient reaches the student, never the teachers
    assert student.grad is not None and all(not p.requires_grad for t in teachers for p in t.parameters())


# ----------------------------------------------------------------------------- main.py

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--data_set", "DIGITS", "--input_size", "32", "--batch_size", "64", "--opt", "sgd", "--lr", "0.05",
         "--weight_decay", "0", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
         "--aa", "none", "--smoothing", "0", "--num_workers", "0", "--device", "cpu", "--disable_eval", "true"]


@pytest.fixture(autouse=True)
def _isolate():
    """main.cli configures the root logger: put pytest's handlers back afterwards."""
    import logging
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def main_py(*args, launcher=()):
    cmd = [sys.executable, *launcher, str(ROOT / "main.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed, arch in enumerate([{"family": "resnet_cifar", "depths": [1, 1, 1], "num_classes": 10},
                                 {"family": "vgg_cifar", "cfg": [8, "M", 16], "num_classes": 10}]):
        torch.manual_seed(seed)
        model = models.build_model(arch)
        paths.append(folder / f"teacher{seed}.pth")
        save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, paths[-1])
    return [str(p) for p in paths]


def last_log(folder):
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


@pytest.mark.e2e
def test_ensemble_with_mixup_accumulation_and_resume(teachers, tmp_path):
    out = tmp_path / "kd"
    common = ["--model", "resnet20", "--teacher", *teachers, "--kd_alpha", "1", "--output_dir", out, *TRAIN,
              "--mixup", "0.8", "--update_freq", "2"]
    proc = main_py(*common, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Distilling from 2 teacher(s) at T = 5, alpha = 1" in proc.stdout + proc.stderr
    [first] = last_log(out)
    assert first["train_loss_kd"] > 0 and first["train_loss_ce"] > 0
    assert first["train_loss"] == pytest.approx(first["train_loss_kd"], rel=1e-4)  # alpha 1: KD alone
    proc = main_py(*common, "--epochs", "2")  # auto-resume continues with the same teachers
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["epoch"] for r in last_log(out)] == [0, 1]


@pytest.mark.e2e
def test_teacher_under_two_gloo_processes(teachers, tmp_path):
    out = tmp_path / "dist"
    proc = main_py("--model", "resnet20", "--teacher", teachers[0], "--epochs", "1", "--output_dir", out,
                   *TRAIN, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [log] = last_log(out)
    assert log["train_loss"] == pytest.approx(0.5 * log["train_loss_ce"] + 0.5 * log["train_loss_kd"], rel=1e-3)


@pytest.mark.cli
@pytest.mark.parametrize("extra,message", [
    (["--kd_alpha", "0.3"], "--kd_alpha / --kd_temperature need --teacher"),
    (["--teacher", "{t}", "--kd_alpha", "1.5"], "--kd_alpha must be in [0, 1]"),
    (["--teacher", "{t}", "--kd_temperature", "0"], "--kd_temperature must be > 0"),
    (["--teacher", "/no/such.pth"], "--teacher /no/such.pth: no such file"),
    (["--teacher", "{seven}"], "has 7 classes but the data set has 10"),
])
def test_bad_teacher_flags(teachers, tmp_path, capsys, extra, message):
    import main
    seven = tmp_path / "seven.pth"
    model = models.build_model({"family": "vgg_cifar", "cfg": [4], "num_classes": 7})
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, seven)
    extra = [e.format(t=teachers[0], seven=seven) for e in extra]
    assert main.cli(["--model", "resnet20", *TRAIN, "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
