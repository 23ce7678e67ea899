"""LR schedules: step and multistep against a hand computation, their flag checks, and a
killed run that resumes on the same learning rate."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import main
from cli import options
import utils
from common.errors import UserError
from helpers import ENV, ROOT


def schedule(*argv, steps=4):
    args = main.parse_args(["--epochs", "6", "--warmup_epochs", "0", *argv])
    options.check_schedule(args)
    return utils.lr_scheduler(args, steps)


def test_multistep_with_warmup_matches_a_hand_computation():
    lr = schedule("--lr", "0.1", "--min_lr", "0", "--warmup_steps", "2", "--sched", "multistep",
                  "--decay_epochs", "2", "4", "--decay_rate", "0.1", steps=4)
    # 2 warmup steps from 0 to 0.1, then 0.1 until epoch 2 (step 8), 0.01 until epoch 4, 0.001
    hand = [0, 0.1] + [0.1] * 6 + [0.01] * 8 + [0.001] * 8
    assert np.allclose(lr, hand, rtol=0, atol=1e-12) and len(lr) == 24


def test_step_schedule_drops_every_period_and_is_floored_at_min_lr():
    lr = schedule("--lr", "1", "--min_lr", "0.2", "--warmup_epochs", "1", "--sched", "step",
                  "--decay_epochs", "2", "--decay_rate", "0.5", steps=3)
    # warmup epoch 0 (3 steps, linear 0 -> 1); epoch 1: 1; epochs 2-3: 0.5; epochs 4-5: 0.25
    hand = [0, 0.5, 1] + [1] * 3 + [0.5] * 6 + [0.25] * 6
    assert np.allclose(lr, hand) and len(lr) == 18
    floored = schedule("--lr", "1", "--min_lr", "0.3", "--sched", "step", "--decay_epochs", "2",
                       "--decay_rate", "0.5", steps=1)
    assert list(floored) == [1, 1, 0.5, 0.5, 0.3, 0.3]


def test_cosine_stays_the_default_and_unchanged():
    args = main.parse_args(["--epochs", "3", "--warmup_epochs", "1", "--lr", "1", "--min_lr", "0"])
    assert args.sched == "cosine"
    assert np.array_equal(utils.lr_scheduler(args, 5), utils.cosine_scheduler(1, 0, 3, 5, warmup_epochs=1))


@pytest.mark.parametrize("argv, needle", [
    (["--decay_epochs", "5"], "--decay_epochs applies to --sched step or multistep"),
    (["--decay_rate", "0.5"], "--decay_rate applies to --sched step or multistep"),
    (["--sched", "multistep"], "--decay_epochs is needed by --sched multistep"),
    (["--sched", "step", "--decay_epochs", "2", "3"], "--decay_epochs takes one period"),
    (["--sched", "multistep", "--decay_epochs", "4", "2"], "increasing"),
    (["--sched", "multistep", "--decay_epochs", "2", "6"], "not before --epochs 6"),
    (["--sched", "step", "--decay_epochs", "6"], "not before --epochs 6: the first drop would never happen"),
    (["--sched", "step", "--decay_epochs", "2", "--decay_rate", "1.5"], "--decay_rate must be in (0, 1)"),
])
def test_schedule_flags_are_checked_up_front(argv, needle):
    args = main.parse_args(["--epochs", "6", *argv])
    with pytest.raises(UserError) as e:
        options.check_ranges(args)
        options.check_combinations(args)
    assert needle in e.value.for_command_line()


def test_a_schedule_error_from_python_names_the_field():
    with pytest.raises(UserError, match=r"ScheduleConfig.decay_epochs is needed by sched multistep"):
        utils.ScheduleConfig(sched="multistep")


@pytest.mark.e2e
def test_a_killed_multistep_run_resumes_on_the_same_lr(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "main.py"), "--model", "convnext_tiny_3M_pruned_cifar10",
            "--epochs", "2", "--opt", "sgd", "--lr", "0.04", "--min_lr", "0", "--sched", "multistep",
            "--decay_epochs", "1", "--decay_rate", "0.5", "--warmup_steps", "2",
            "--data_set", "DIGITS", "--input_size", "32", "--batch_size", "128", "--num_workers", "0",
            "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--device", "cpu",
            "--output_dir", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 300
    while not (out / "checkpoint-0.pth").exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "checkpoint-1.pth").exists(), "the run ended before the kill"
    done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resume" in done.stdout + done.stderr or "resum" in (done.stdout + done.stderr).lower()
    assert "LR schedule: multistep, x0.5 at epochs [1] after 2 warmup steps" in done.stdout + done.stderr
    lrs = [json.loads(line)["train_lr"] for line in (out / "log.txt").read_text().splitlines()]
    # epoch 1 ran in the resumed process: the drop falls where the first run put it
    assert len(lrs) == 2 and lrs[1] == pytest.approx(0.02) and lrs[0] < 0.04
