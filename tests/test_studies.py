"""Pruning studies end to end: compare_criteria, sensitivity and iterative rounds, with kills."""
import json
import logging
import signal
import subprocess
import sys

import pytest


import models
from checkpoints.io import load_checkpoint_file
from helpers import ENV, ROOT

TRAIN = ("--batch_size 64 --opt sgd --lr 0.02 --weight_decay 0 --warmup_epochs 0 --mixup 0 --cutmix 0 "
         "--reprob 0 --aa none --smoothing 0 --num_workers 0 --device cpu")


def tool(script, *args):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def kill_after(cmd, marker):
    """Start cmd, SIGKILL it right after it prints a line starting with marker."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return proc.returncode


COMPARE = ["--criteria", "l1", "random", "opnorm:scope=group,reduce=max", "taylor:calib_batches=1",
           "--budgets", "ratio=0.5", "params=0.6", "--seeds", "0", "1", "2", "--eval_subset", "60"]


@pytest.mark.e2e
def test_compare_criteria_rows_files_and_resume_after_a_kill(source, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "scripts/compare_criteria.py"), "--checkpoint", str(source),
           "--output_dir", str(out), *COMPARE]
    assert kill_after(cmd, "[3/") == -signal.SIGKILL
    assert 3 <= len(rows(out)) < 16
    proc = tool("scripts/compare_criteria.py", "--checkpoint", source, "--output_dir", out, *COMPARE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = rows(out)
    # deterministic criteria once per budget, seeded ones once per seed and budget
    assert len(got) == 2 * (1 + 3 + 1 + 3)
    assert len({(r["criterion"], r["budget"], r["seed"]) for r in got}) == len(got)
    summary = json.loads((out / "summary.json").read_text())
    random_row = next(r for r in summary["rows"] if r["criterion"] == "random" and r["budget"] == "ratio=0.5")
    assert random_row["n"] == 3 and random_row["acc_pruned_sd"] >= 0
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "summary.csv").exists()
    assert "| ratio=0.5 | random |" in proc.stdout
    # another study into the same folder is refused, the folder untouched
    before = (out / "results.jsonl").read_text()
    proc = tool("scripts/compare_criteria.py", "--checkpoint", source, "--output_dir", out, "--criteria", "l2",
                "--budgets", "ratio=0.5")
    assert proc.returncode == 2 and "holds a study with other settings" in proc.stderr
    assert (out / "results.jsonl").read_text() == before


@pytest.mark.cli
def test_compare_criteria_bad_input(source, tmp_path, capsys):
    from cli import compare_criteria
    logging.getLogger().handlers.clear()  # an earlier in-process run may have logged to a closed stream
    for argv, message in [(["--criteria", "l1:scope"], "expected scope=VALUE"),
                          (["--criteria", "l1:depth=3"], "is not a scoring flag"),
                          (["--budgets", "13M"], "give a named shape (none for this model)"),
                          (["--budgets", "params=1.5"], "the share must be in (0, 1)"),
                          (["--train_args", "--lr 1"], "--train_args is used only with --finetune_epochs"),
                          (["--finetune_epochs", "1", "--train_args", "--epochs 3"], "--epochs is set by this tool"),
                          (["--budgets", "ratio=0.5", "--eval_subset", "100000"],
                           "the evaluation split has only 360 images")]:
        status = compare_criteria.main(["--checkpoint", str(source), "--output_dir", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert status == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_sensitivity_rows_plot_tolerance_and_resume(source, tmp_path):
    out = tmp_path / "sens"
    argv = ["--checkpoint", str(source), "--output_dir", str(out), "--criterion", "l1", "--ratios", "0.25", "0.5",
            "0.75", "--eval_subset", "60", "--tolerance", "100"]
    assert kill_after([sys.executable, str(ROOT / "pruning/sensitivity.py"), *argv], "[2/") == -signal.SIGKILL
    proc = tool("pruning/sensitivity.py", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = rows(out)
    groups = {g.name for g in models.channel_groups(load_checkpoint_file(source)["arch"])}
    assert {(r["set"], r["ratio"]) for r in got} == {(g, x) for g in groups for x in (0.25, 0.5, 0.75)}
    assert len(got) == 3 * len(groups)
    assert (out / "sensitivity.png").stat().st_size > 1000
    # a tolerance of 100 points keeps every set at the largest ratio
    line = proc.stdout.split("--group_ratio ")[1].splitlines()[0]
    assert sorted(line.split()) == sorted(f"'{g}=0.75'" for g in groups)


def test_tolerance_picks_the_last_ratio_before_the_first_drop():
    from cli.sensitivity import tolerated
    assert tolerated([(0.1, 90), (0.2, 89.5), (0.3, 85), (0.4, 89.9)], 90, 1) == 0.2
    assert tolerated([(0.1, 80)], 90, 1) == 0.0


@pytest.mark.e2e
def test_two_iterative_rounds_with_ensemble_distillation(source, tmp_path):
    out = tmp_path / "iter"
    argv = ["--checkpoint", str(source), "--output_dir", str(out), "--rounds", "2", "--prune",
            "--criterion l1 --ratio 0.3", "--finetune_epochs", "1", "--train_args", TRAIN,
            "--distill_epochs", "1"]
    assert kill_after([sys.executable, str(ROOT / "pruning/iterative.py"), *argv], "[round 2/2] pruned") \
        == -signal.SIGKILL
    proc = tool("pruning/iterative.py", *argv, "--launcher", "slurm")  # another parent, rounds as jobs
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local executor" in proc.stdout
    got = rows(out)
    assert [r["round"] for r in got] == [1, 2, "distill"]
    params = [r["params"] for r in got[:2]]
    src_params = models.count_arch(load_checkpoint_file(source)["arch"], 32)[0]
    assert src_params > params[0] > params[1]
    for r in got[:2]:
        load_checkpoint_file(r["snapshot"])
    for r in got[2:]:  # the final snapshot evaluates with main.py
        ev = subprocess.run([sys.executable, str(ROOT / "main.py"), "--eval", "true", "--resume", r["snapshot"],
                             "--data_set", "DIGITS", "--num_workers", "0", "--device", "cpu"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert ev.returncode == 0, ev.stderr[-2000:]
    log = [json.loads(x) for x in (out / "distill" / "log.txt").read_text().splitlines()]
    assert log[-1]["train_loss_kd"] > 0
    assert "| distill |" in proc.stdout


@pytest.mark.cli
def test_flags_that_would_be_ignored_are_refused(source, tmp_path, capsys):
    from cli import iterative, sensitivity
    out = tmp_path / "never"
    logging.getLogger().handlers.clear()  # an earlier in-process run may have logged to a closed stream
    for script, argv, message in [
            ("pruning/sensitivity.py", ["--criterion", "l1", "--seeds", "0", "1"], "gives the same scores for every seed"),
            ("pruning/iterative.py", ["--prune", "--ratio 0.2", "--kd_alpha", "0.5"], "give --distill_epochs"),
            ("pruning/iterative.py", ["--prune", "--ratio 0.2", "--train_args", "--disable_eval true"],
             "--disable_eval is set by this tool")]:
        tool_main = (sensitivity if "sensitivity" in script else iterative).main
        status = tool_main(["--checkpoint", str(source), "--output_dir", str(out), *argv])
        err = capsys.readouterr().err
        assert status == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
