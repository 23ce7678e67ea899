"""Study controls and cluster dispatch: from-scratch cells (fresh weights, the stated epochs),
and --launcher slurm on submitit's local executor (real subprocesses): every row once, a killed
job retried, a study resumed after its parent is killed, a failing cell reported with its log."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import compare_criteria
import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from helpers import ENV, ROOT

TRAIN = ("--batch_size 64 --opt sgd --lr 0.02 --weight_decay 0 --warmup_epochs 0 --mixup 0 --cutmix 0 "
         "--reprob 0 --aa none --smoothing 0 --num_workers 0 --device cpu")
ARCH = {"family": "convnext", "depths": [1, 1], "dims": [16, 32], "num_classes": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ConvNeXt checkpoint recording 2 epochs of DIGITS training at 32 px."""
    torch.manual_seed(0)
    model = models.build_model(ARCH, layer_scale_init_value=0.5)
    path = tmp_path_factory.mktemp("src") / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "epoch": 1,
                          "args": {"data_set": "DIGITS", "input_size": 32}}, path)
    return path


def rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def epochs_logged(folder):
    return len((folder / "log.txt").read_text().splitlines())


@pytest.mark.e2e
def test_controls_start_from_fresh_weights_and_train_the_stated_epochs(trained, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_criteria.main(["--checkpoint", str(trained), "--output_dir", str(out), "--criteria", "l1",
                                  "--budgets", "ratio=0.5", "--seeds", "3", "--finetune_epochs", "1",
                                  "--train_args", TRAIN, "--controls", "scratch_e", "scratch_b"]) == 0
    printed = capsys.readouterr().out
    got = {r["criterion"]: r for r in rows(out)}
    assert set(got) == {"l1", "scratch_e", "scratch_b"} and got["scratch_e"]["acc_pruned"] is None
    name = "{}_ratio-0.5_seed3"
    fresh = load_checkpoint_file(out / "scratch" / f"{name.format('scratch_e')}.pth")
    pruned = load_checkpoint_file(out / "pruned" / f"{name.format('l1')}.pth")
    assert fresh["arch"] == pruned["arch"]  # the first criterion's shape ...
    torch.manual_seed(3)
    init = models.build_model(pruned["arch"]).state_dict()
    assert all(torch.equal(fresh["model"][k], init[k]) for k in init)  # ... from the family's seeded init
    assert not torch.equal(fresh["model"]["stages.1.0.pwconv1.weight"], pruned["model"]["stages.1.0.pwconv1.weight"])
    dense_macs = models.count_arch(ARCH, 32)[1]
    macs = got["scratch_b"]["macs"]
    b_epochs = math.ceil((dense_macs * 2 + macs * 1) / macs)  # 2 recorded dense epochs + 1 fine-tune epoch
    assert epochs_logged(out / "scratch" / name.format("scratch_e")) == 1
    assert epochs_logged(out / "scratch" / name.format("scratch_b")) == b_epochs > 3
    assert "| ratio=0.5 | scratch_b |" in printed and "trained" in printed


@pytest.mark.e2e
def test_slurm_flags_are_refused_with_the_local_launcher(trained, tmp_path, capsys):
    for argv in (["--slurm_partition", "gpu"], ["--max_parallel", "4"], ["--launcher", "slurm", "--max_parallel", "0"]):
        assert compare_criteria.main(["--checkpoint", str(trained), "--output_dir", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: --") and ("apply to --launcher slurm" in err or "must be >= 1" in err), err
    assert not (tmp_path / "x").exists()


def _parent(trained, out, *extra):
    return [sys.executable, str(ROOT / "scripts/compare_criteria.py"), "--checkpoint", str(trained),
            "--output_dir", str(out), "--criteria", "l1", "random", "--budgets", "ratio=0.5", "--seeds", "0", "1", "2",
            "--eval_subset", "60", "--launcher", "slurm", "--max_parallel", "2", *extra]


@pytest.mark.e2e
def test_local_executor_retries_a_killed_job_resumes_after_the_parent_dies_and_writes_each_row_once(
        trained, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(_parent(trained, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    jobs, end = out / "jobs", time.time() + 120
    while not (jobs.exists() and any(p.name.isdigit() for p in jobs.iterdir())) and time.time() < end:
        time.sleep(0.05)
    victim = min(int(p.name) for p in jobs.iterdir() if p.name.isdigit())  # local job id = its pid
    os.kill(victim, signal.SIGKILL)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[1/"):
            proc.send_signal(signal.SIGKILL)  # the parent only; its jobs may still finish
            break
    proc.wait(timeout=60)
    text = "".join(seen)
    assert "local executor" in text and f"job {victim}" in text and "resubmitting" in text, text[-3000:]
    done = subprocess.run(_parent(trained, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = [(r["criterion"], r["seed"]) for r in rows(out)]
    assert sorted(keys) == [("l1", 0), ("random", 0), ("random", 1), ("random", 2)]  # each exactly once
    assert "| ratio=0.5 | random |" in done.stdout


@pytest.mark.e2e
def test_a_failing_cell_is_reported_with_its_log(trained, tmp_path):
    bad = subprocess.run(_parent(trained, tmp_path / "bad", "--retries", "0", "--criteria", "l1", "--seeds", "0",
                                 "--finetune_epochs", "1", "--train_args", TRAIN.replace("64", "5000")),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and err[-1].startswith("error: ") and "failed after 1 attempt" in err[-1], err[-3:]
    log = err[-1].split("(log: ")[1].split(")")[0]
    assert Path(log).exists() and "smaller than one optimizer step" in err[-1] + Path(log).read_text()


@pytest.mark.e2e
def test_sensitivity_cells_run_as_jobs(trained, tmp_path):  # iterative: tests/test_studies.py
    sens = subprocess.run([sys.executable, str(ROOT / "pruning/sensitivity.py"), "--checkpoint", str(trained),
                           "--output_dir", str(tmp_path / "sens"), "--sets", "stages.1.*", "--ratios", "0.25", "0.5",
                           "--eval_subset", "60", "--launcher", "slurm", "--max_parallel", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert sens.returncode == 0, sens.stderr[-2000:]
    assert sorted(r["ratio"] for r in rows(tmp_path / "sens")) == [0.25, 0.5] and "local executor" in sens.stdout

