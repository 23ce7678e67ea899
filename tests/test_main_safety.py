"""main.py off the happy path: every bad flag is one line, no silent wrong number, no lost or
overwritten file after kills, no hang when a rank stalls."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from helpers import ENV, ROOT

MODEL = "convnext_tiny_3M_pruned_cifar10"
DATA = ["--data_set", "DIGITS", "--num_workers", "0", "--device", "cpu"]
FAST = [*DATA, "--input_size", "32", "--batch_size", "128", "--warmup_epochs", "0", "--aa", "none",
        "--reprob", "0", "--mixup", "0", "--cutmix", "0"]


def cmd(*args, launcher=()):
    return [sys.executable, *launcher, str(ROOT / "main.py"), *map(str, args)]


def run_main(*args, timeout=300):
    return subprocess.run(cmd(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_dir(trained):
    """The shared one-epoch run folder (conftest.trained); the checkpoint records input_size 32."""
    return trained[0]


# ----------------------------------------------------------------------------- bad flags

BAD_FLAGS = {
    "--eval true without weights": (["--eval", "true"], "--eval true needs trained weights"),
    "--clip_grad -1": (["--clip_grad", "-1"], "--clip_grad must be > 0"),
    "--layer_decay -1": (["--layer_decay", "-1"], "--layer_decay must be in (0, 1]"),
    "--model_ema_decay 2": (["--model_ema_decay", "2"], "--model_ema_decay must be in [0, 1)"),
    "--weight_decay -1": (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    "--drop_path -0.5": (["--drop_path", "-0.5"], "--drop_path must be in [0, 1)"),
    "--drop_path 1.5": (["--drop_path", "1.5"], "--drop_path must be in [0, 1)"),
    "--mixup_prob 2": (["--mixup_prob", "2"], "--mixup_prob must be in [0, 1]"),
    "--momentum 5": (["--momentum", "5"], "--momentum must be in [0, 1)"),
    "--min_lr above --lr": (["--min_lr", "0.1", "--lr", "0.01"], "--min_lr 0.1 is above --lr 0.01"),
    "--start_epoch past --epochs": (["--start_epoch", "5", "--epochs", "3"], "leaves nothing to train"),
    "--input_size 0": (["--input_size", "0"], "--input_size must be >= 1"),
    "--input_size 7": (["--input_size", "7"], "--input_size 7 is too small for convnext_tiny: the smallest it takes is 32"),
    "--input_size 16": (["--input_size", "16"], "the smallest it takes is 32"),
    "--input_size 31": (["--input_size", "31"], "the smallest it takes is 32"),
    "--smoothing 1.5": (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    "--warmup_epochs -5": (["--warmup_epochs", "-5"], "--warmup_epochs must be >= 0"),
    "--num_workers -1": (["--num_workers", "-1"], "--num_workers must be >= 0"),
    "--seed -1": (["--seed", "-1"], "--seed must be in [0, 2147483647]"),
    "--crop_pct 0": (["--crop_pct", "0"], "--crop_pct must be in (0, 1]"),
    "--opt_betas 0.9": (["--opt_betas", "0.9"], "--opt_betas takes two values"),
    "--recount -2": (["--recount", "-2"], "--recount must be >= 1"),
    "--color_jitter -1": (["--color_jitter", "-1"], "--color_jitter must be >= 0"),
    "--save_ckpt_freq 0": (["--save_ckpt_freq", "0"], "--save_ckpt_freq must be >= 1"),
    "--dist_timeout 0": (["--dist_timeout", "0"], "--dist_timeout must be > 0"),
    "--lr nan": (["--lr", "nan"], "--lr must be >= 0, got nan"),
    "--aa augmix width 0": (["--aa", "augmix-m5-w0"], "an AugMix width (-wN) must be at least 1"),
    "--model typo": (["--model", "convnext_tinyy"], "unknown model 'convnext_tinyy'"),
    "--output_dir is a file": (["--output_dir", "{file}"], "is a file, not a folder"),
    "--log_dir is a file": (["--log_dir", "{file}"], "is a file, not a folder"),
    "--resume missing": (["--resume", "{missing}"], "no such file"),
    "--fold without --eval": (["--fold", "true"], "--fold true applies to --eval true"),
}


@pytest.mark.cli
@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_every_bad_flag_is_one_line_before_any_data(case, tmp_path, capsys, monkeypatch):
    argv, expected = BAD_FLAGS[case]
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file", missing=tmp_path / "none.pth") for a in argv]
    # the data set must not even be looked at: a missing ImageNet folder would fail otherwise
    monkeypatch.setattr(main.datasets, "build_dataset", lambda **k: pytest.fail("data was built"))
    assert main.cli(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


@pytest.mark.cli
@pytest.mark.parametrize("content", [b"", b"\x13\x37 random bytes " * 50, b'{"epoch": 0}\n'],
                         ids=["empty", "random", "log.txt"])
def test_non_checkpoints_in_every_entry_point(tmp_path, capsys, content):
    from cli.prune import main as prune
    from cli import bench_engine
    from cli import benchmark
    from cli import inference
    from common.errors import run_cli
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    calls = [
        lambda: main.cli(["--eval", "true", "--resume", str(bad), *FAST]),
        lambda: main.cli(["--finetune", str(bad), "--epochs", "1", *FAST]),
        lambda: inference.main(["--image", str(image), "--checkpoint", str(bad)]),
        lambda: benchmark.cli(["--models", str(bad), "--input_size", "32"]),
        lambda: run_cli(bench_engine.main, ["--model", str(bad), "--input_size", "32"]),
        lambda: prune(["--checkpoint", str(bad), "--output", str(tmp_path / "o.pth"),
                      "--dims", "8", "8", "8", "8"]),
    ]
    for call in calls:
        assert call() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert ("empty (0 bytes)" if not content else "not a PyTorch checkpoint") in err[0]


# ----------------------------------------------------------------------------- no silent wrong numbers

@pytest.mark.e2e
def test_eval_takes_the_input_size_the_checkpoint_was_trained_at(trained_dir, capsys):
    [log] = read_log(trained_dir)
    assert main.cli(["--eval", "true", "--resume", str(trained_dir / "checkpoint-0.pth"), *DATA]) == 0
    out = capsys.readouterr().out
    assert "Input size 32 px, as the checkpoint was trained" in out
    acc = float(re.findall(r"^\* Acc@1 ([\d.]+)", out, re.M)[-1])
    assert acc == pytest.approx(log["test_acc1"], abs=1e-3)


@pytest.mark.cli
def test_eval_with_auto_resume_takes_the_newest_checkpoint(trained_dir, capsys):
    [log] = read_log(trained_dir)
    assert main.cli(["--eval", "true", "--output_dir", str(trained_dir), *DATA]) == 0
    out = capsys.readouterr().out
    assert "Auto resume checkpoint" in out
    assert float(re.findall(r"^\* Acc@1 ([\d.]+)", out, re.M)[-1]) == pytest.approx(log["test_acc1"], abs=1e-3)


@pytest.mark.cli
def test_eval_of_the_folded_form_gives_the_same_accuracy(trained_dir, capsys):
    [log] = read_log(trained_dir)
    assert main.cli(["--eval", "true", "--fold", "true", "--resume", str(trained_dir / "checkpoint-0.pth"),
                     *DATA]) == 0
    out = capsys.readouterr().out
    assert "folded (inference) form" in out
    assert float(re.findall(r"^\* Acc@1 ([\d.]+)", out, re.M)[-1]) == pytest.approx(log["test_acc1"], abs=1e-3)


@pytest.mark.e2e
def test_eval_at_another_size_warns(trained_dir, capsys):
    assert main.cli(["--eval", "true", "--resume", str(trained_dir / "checkpoint-0.pth"), *DATA,
                     "--input_size", "64"]) == 0
    assert "trained at 32 px: its accuracy at this size may be far lower" in capsys.readouterr().out


@pytest.mark.e2e
def test_logged_metrics_do_not_depend_on_print_freq(tmp_path):
    logs = []
    for freq in (1, 5):
        out = tmp_path / f"freq{freq}"
        proc = run_main("--model", MODEL, "--epochs", 1, "--output_dir", out, "--print_freq", freq,
                        "--disable_eval", "true", *FAST)
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(read_log(out)[0])
    assert set(logs[0]) == set(logs[1])
    for key in logs[0]:
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-5), key


@pytest.mark.cli
def test_nan_weights_are_refused_by_eval(trained_dir, tmp_path, capsys):
    ckpt = load_checkpoint_file(trained_dir / "checkpoint-0.pth")
    ckpt["model"]["head.weight"][0, 0] = float("nan")
    save_checkpoint_file(ckpt, tmp_path / "nan.pth")
    assert main.cli(["--eval", "true", "--resume", str(tmp_path / "nan.pth"), *DATA]) == 2
    assert "NaN or infinite values" in capsys.readouterr().err


# ----------------------------------------------------------------------------- files

@pytest.mark.cli
def test_a_foreign_output_dir_is_refused_and_left_untouched(trained_dir, tmp_path, capsys):
    out = tmp_path / "reused"
    out.mkdir()
    for name in ("checkpoint-5.pth", "checkpoint-best.pth"):
        (out / name).write_bytes((trained_dir / "checkpoint-0.pth").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main.cli(["--model", MODEL, "--epochs", "1", "--output_dir", str(out), "--auto_resume", "false",
                     *FAST]) == 2
    assert "already holds checkpoint-5.pth, checkpoint-best.pth from another run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.cli
def test_auto_resume_of_another_model_says_where_the_checkpoint_came_from(trained_dir, capsys):
    assert main.cli(["--model", "convnext_tiny_13M_pruned_cifar10", "--epochs", "3",
                     "--output_dir", str(trained_dir), *FAST]) == 2
    err = capsys.readouterr().err
    assert "picked by auto-resume from --output_dir" in err and "--auto_resume false" in err


def _wait_for(predicate, proc, timeout, poll=0.002):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(poll)
    return None


@pytest.mark.e2e
def test_kill_during_the_best_checkpoint_write_then_resume(tmp_path):
    out = tmp_path / "killed"
    argv = cmd("--model", MODEL, "--epochs", 4, "--lr", "2e-3", "--output_dir", out, *FAST)
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def best_temp():  # a best checkpoint being written after epoch 0 is complete on disk
            names = os.listdir(out) if out.is_dir() else []
            return "checkpoint-0.pth" in names and any(n.startswith(".tmp-checkpoint-best") for n in names)
        caught = _wait_for(best_temp, proc, timeout=240)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    if not caught:
        pytest.skip("no new best accuracy after epoch 0 in this run: nothing to interrupt")
    assert any(n.startswith(".tmp-") for n in os.listdir(out))
    done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert "checkpoint-best.pth" in names and "checkpoint-3.pth" in names
    assert not any(n.startswith(".tmp-") for n in names)
    logs = read_log(out)
    assert [log["epoch"] for log in logs] == [0, 1, 2, 3]
    best = load_checkpoint_file(out / "checkpoint-best.pth")
    assert best["max_accuracy"] == pytest.approx(max(log["test_acc1"] for log in logs))
    # a rerun of the finished run says so and changes nothing
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    again = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in os.listdir(out)} == before


def _default_sigint():
    # a shell starts background jobs with SIGINT ignored, and children inherit that: a test
    # suite run with `&` would hand main.py an ignored Ctrl-C. Give it a terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.e2e
def test_ctrl_c_is_one_line(tmp_path):
    proc = subprocess.Popen(cmd("--model", MODEL, "--epochs", 100, *FAST, "--print_freq", 1), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    for line in proc.stdout:
        if line.startswith("Epoch: [0]"):
            break
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("main.py went on after Ctrl-C")
    assert proc.returncode == 130
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning")]
    assert lines[-1].startswith("interrupted") and "Traceback" not in err


# ----------------------------------------------------------------------------- distributed

def _rank_pid(parent, rank):
    """The pid of the worker with RANK=rank among the children of `parent` (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.e2e
def test_a_stalled_rank_ends_the_job_with_a_message(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    log = tmp_path / "stdout.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd("--model", MODEL, "--epochs", 5, *FAST, "--print_freq", 1,
                                    "--dist_timeout", 10, launcher=launcher),
                                cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        assert _wait_for(lambda: "Epoch: [0]" in log.read_text(), proc, timeout=180, poll=0.2)
        stopped = _rank_pid(proc.pid, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        start = time.time()
        _, err = proc.communicate(timeout=150)
        elapsed = time.time() - start
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    assert proc.returncode != 0
    assert re.search(r"error: rank 0 of 2: a collective failed, another rank stalled or died "
                     r"\(no answer within --dist_timeout 10 s\)", err), err[-3000:]
    assert elapsed < 120
