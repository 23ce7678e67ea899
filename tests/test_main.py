"""main.py end to end on DIGITS at 32 px: train, auto-resume, evaluate, torchrun, bad input."""
import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints.io import load_checkpoint_file
from common import errors
import main
import models
from cli import options
import run_with_submitit
from helpers import ENV, ROOT

MODEL = "convnext_tiny_3M_pruned_cifar10"
FAST = ["--data_set", "DIGITS", "--input_size", "32", "--batch_size", "128", "--num_workers", "0",
        "--warmup_epochs", "0", "--aa", "none", "--reprob", "0", "--device", "cpu"]
# One intra-op thread: on a busy 2-core machine, two spinning threads per process are far slower.


def run_main(*args, launcher=(), timeout=300):
    cmd = [sys.executable, *launcher, str(ROOT / "main.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines()]


def acc1_printed(stdout):
    found = re.findall(r"^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)$", stdout, re.M)
    assert found, stdout[-2000:]
    return float(found[-1][0])


@pytest.fixture(autouse=True)
def _isolate():
    """main.cli configures the root logger: put pytest's handlers back afterwards. In-process
    runs use one intra-op thread, like the subprocesses (ENV)."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)


# ----------------------------------------------------------------------------- parser

def test_official_flags_and_defaults():
    args = main.parse_args([])
    official = dict(batch_size=64, epochs=300, update_freq=1, drop_path=0,
                    layer_scale_init_value=1e-6, model_ema=False, model_ema_decay=0.9999,
                    model_ema_force_cpu=False, model_ema_eval=False, opt="adamw", opt_eps=1e-8,
                    opt_betas=None, clip_grad=None, momentum=0.9, weight_decay=0.05,
                    weight_decay_end=None, lr=4e-3, layer_decay=1.0, min_lr=1e-6, warmup_epochs=20,
                    warmup_steps=-1, color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", smoothing=0.1,
                    train_interpolation="bicubic", crop_pct=None, reprob=0.25, remode="pixel",
                    recount=1, resplit=False, mixup=0.8, cutmix=1.0, cutmix_minmax=None,
                    mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", finetune="",
                    head_init_scale=1.0, model_key="model|module", model_prefix="",
                    data_path="/datasets01/imagenet_full_size/061417/", eval_data_path=None,
                    nb_classes=1000, imagenet_default_mean_and_std=True, data_set="IMNET",
                    output_dir="", log_dir=None, device="cuda", seed=0, resume="", auto_resume=True,
                    save_ckpt=True, save_ckpt_freq=1, save_ckpt_num=3, start_epoch=0, eval=False,
                    dist_eval=True, disable_eval=False, pin_mem=True, world_size=1,
                    local_rank=-1, dist_on_itp=False, dist_url="env://", use_amp=False,
                    enable_wandb=False, project="convnext", wandb_ckpt=False)
    assert {k: getattr(args, k) for k in official} == official
    assert args.model is None  # convnext_tiny, unless a checkpoint brings its own shape
    assert args.input_size is None  # the checkpoint's, else 224
    assert args.num_workers == min(10, os.cpu_count())  # no more loader processes than CPUs
    help_text = errors.ArgumentParser("main.py", parents=[options.get_args_parser()]).format_help()
    for shown in ("training epochs (default: 300)", "(default: 20)", "(default: True)"):
        assert shown in " ".join(help_text.split()), shown
    assert (args.channels_last, args.compile, args.amp_dtype, args.print_freq) == (False, False, None, 10)
    parsed = main.parse_args(["--eval", "True", "--model_ema", "1", "--pin_mem", "no", "--local-rank=3"])
    assert parsed.eval is True and parsed.model_ema is True and parsed.pin_mem is False
    assert parsed.local_rank == 3 and main.parse_args(["--local_rank", "2"]).local_rank == 2


def _doc_commands(path):
    """(script, argv) of every main.py / run_with_submitit.py command in a Markdown file."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", Path(path).read_text(), re.S | re.M)
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        m = re.search(r"(main\.py|run_with_submitit\.py)\s(.*)$", line.strip())
        if m and ("python" in line or "torchrun" in line):
            yield m.group(1), shlex.split(m.group(2))


@pytest.mark.e2e
@pytest.mark.parametrize("doc", ["TRAINING.md", "INSTALL.md"])
def test_every_documented_command_parses(doc):
    commands = list(_doc_commands(ROOT / doc))
    assert len(commands) >= (12 if doc == "TRAINING.md" else 2)
    for script, argv in commands:
        parse = main.parse_args if script == "main.py" else run_with_submitit.parse_args
        args = parse(argv)
        if args.model is not None:
            assert args.model in models.OUR_MODELS, f"{doc}: unknown model {args.model}"


@pytest.mark.e2e
def test_submitit_missing_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert run_with_submitit.cli(["--nodes", "1", "--ngpus", "1", "--job_dir", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install submitit" in err[0]


# ----------------------------------------------------------------------------- train / resume / eval

@pytest.mark.e2e
def test_train_one_epoch_writes_checkpoints(trained):
    out, proc = trained
    assert {p.name for p in out.iterdir()} == {"checkpoint-0.pth", "checkpoint-best.pth", "log.txt"}
    ckpt = load_checkpoint_file(out / "checkpoint-0.pth")
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == MODEL
    assert ckpt["arch"]["dims"] == [32, 64, 128, 256] and ckpt["arch"]["num_classes"] == 10
    [log] = read_log(out)
    assert log["test_num_images"] == 360 and ckpt["max_accuracy"] == log["test_acc1"]
    assert acc1_printed(proc.stdout) == pytest.approx(log["test_acc1"], abs=1e-3)


@pytest.mark.e2e
def test_auto_resume_continues_and_keeps_max_accuracy_then_evaluates(trained):
    out, _ = trained
    proc = run_main("--epochs", 2, "--auto_resume", "true", "--output_dir", out, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Auto resume checkpoint" in proc.stdout and "Epoch: [0]" not in proc.stdout
    logs = read_log(out)
    assert [log["epoch"] for log in logs] == [0, 1]
    ckpt = load_checkpoint_file(out / "checkpoint-1.pth")
    assert ckpt["epoch"] == 1
    assert ckpt["max_accuracy"] == max(log["test_acc1"] for log in logs)  # epoch 0's best kept

    # evaluation: no --model needed, the checkpoint's arch rebuilds the shape
    proc = run_main("--eval", "true", "--resume", out / "checkpoint-1.pth", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert acc1_printed(proc.stdout) == pytest.approx(logs[1]["test_acc1"], abs=1e-3)


@pytest.mark.e2e
def test_official_format_checkpoint_evaluates(trained, tmp_path, capsys):
    out, _ = trained
    ours = load_checkpoint_file(out / "checkpoint-0.pth")
    official = {"model": ours["model"], "model_ema": ours["model"], "optimizer": ours["optimizer"],
                "epoch": "best", "scaler": {},
                "args": argparse.Namespace(model=MODEL, input_size=224, lr=4e-3, data_set="CIFAR")}
    path = tmp_path / "checkpoint-best.pth"
    torch.save(official, path)   # plain torch.save, no arch: as the official repo wrote them
    assert main.cli(["--model", MODEL, "--eval", "true", "--resume", str(path), "--model_ema", "true",
                     *FAST]) == 0
    assert acc1_printed(capsys.readouterr().out) == pytest.approx(ours["max_accuracy"], abs=1e-3)
    # without --model the shape is inferred from the weights
    assert main.cli(["--eval", "true", "--resume", str(path), *FAST]) == 0
    assert acc1_printed(capsys.readouterr().out) == pytest.approx(ours["max_accuracy"], abs=1e-3)
    # the EMA is evaluated too when asked; refused where there is none to evaluate
    assert main.cli(["--eval", "true", "--resume", str(path), "--model_ema", "true", "--model_ema_eval", "true",
                     *FAST]) == 0
    both = re.findall(r"^\* Acc@1 ([\d.]+) ", capsys.readouterr().out, re.M)  # the model's, then the EMA's
    assert len(both) == 2 and all(float(a) == pytest.approx(ours["max_accuracy"], abs=1e-3) for a in both)
    assert main.cli(["--eval", "true", "--resume", str(path), "--model_ema_eval", "true", *FAST]) == 2
    assert "needs --model_ema true" in capsys.readouterr().err
    assert main.cli(["--eval", "true", "--resume", str(out / "checkpoint-0.pth"), "--model_ema", "true",
                     "--model_ema_eval", "true", *FAST]) == 2
    assert "holds no model_ema weights" in capsys.readouterr().err


@pytest.mark.e2e
def test_finetune_changes_the_head(trained, tmp_path, capsys):
    out, _ = trained
    src = load_checkpoint_file(out / "checkpoint-0.pth")
    model = models.create_model(MODEL, num_classes=100)
    model.load_state_dict({k: v for k, v in src["model"].items() if not k.startswith("head.")}, strict=False)
    path = tmp_path / "in100.pth"
    torch.save({"model": model.state_dict()}, path)  # a released-style file: weights only
    ft = tmp_path / "ft"
    # --lr 0: the backbone must come out exactly as loaded; the new 10-class head is fresh
    assert main.cli(["--finetune", str(path), "--epochs", "1", "--output_dir", str(ft), "--lr", "0",
                     "--min_lr", "0", "--disable_eval", "true", "--layer_decay", "0.8", *FAST]) == 0
    stdout = capsys.readouterr().out
    assert "Removing key head.weight" in stdout and "Layer decay: 6 layers" in stdout
    ckpt = load_checkpoint_file(ft / "checkpoint-0.pth")
    assert ckpt["arch"]["num_classes"] == 10 and ckpt["model"]["head.weight"].shape == (10, 256)
    for key, value in ckpt["model"].items():
        if not key.startswith("head."):
            assert torch.equal(value, src["model"][key]), key


# ----------------------------------------------------------------------------- distributed

@pytest.mark.e2e
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "dist"
    proc = run_main("--model", MODEL, "--epochs", 1, "--output_dir", out, *FAST,
                    launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert len(re.findall(r"distributed init \(rank \d of 2\): env://, gloo", text)) == 2
    assert len(re.findall(r"^\* Acc@1", proc.stdout, re.M)) == 1     # printed by rank 0 only
    assert {p.name for p in out.iterdir()} == {"checkpoint-0.pth", "checkpoint-best.pth", "log.txt"}
    [log] = read_log(out)                                              # one writer
    assert log["test_num_images"] == 360                              # every val image once
    assert load_checkpoint_file(out / "checkpoint-0.pth")["args"]["world_size"] == 2


# ----------------------------------------------------------------------------- bad input

@pytest.mark.e2e
def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(_pickle_running(f"touch {marker}"))
    proc = run_main("--model", MODEL, "--eval", "true", "--resume", evil, *FAST)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing to load"), proc.stderr
    assert not marker.exists()


def _pickle_running(command):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (command,))
    import io
    buf = io.BytesIO()
    torch.save({"model": {}, "payload": RunsCode()}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def truncated(trained, tmp_path_factory):
    out, _ = trained
    cut = tmp_path_factory.mktemp("bad") / "cut.pth"
    data = (out / "checkpoint-0.pth").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    return cut


BAD_INPUTS = {
    "missing data path": (["--data_set", "CIFAR10", "--data_path", "/nonexistent/cifar"], "/nonexistent/cifar"),
    "unknown data set": (["--data_set", "MNIST"], "invalid choice: 'MNIST'"),
    "unknown model": (["--model", "convnext_nope"], "unknown model 'convnext_nope'"),
    "another shape": (["--model", "convnext_tiny_13M_pruned_cifar10", "--eval", "true", "--resume", "{ckpt}"],
                      "checkpoint holds ConvNeXt depths [3, 3, 9, 3] dims [32, 64, 128, 256]"),
    "truncated checkpoint": (["--eval", "true", "--resume", "{cut}"], "truncated"),
    "fp16 on cpu": (["--use_amp", "true", "--amp_dtype", "fp16"], "fp16 needs CUDA"),
    "bad device": (["--device", "tpu9"], "is not a device"),
    "odd batch with mixup": (["--batch_size", "65"], "even --batch_size"),
    "unknown optimizer": (["--model", MODEL, "--opt", "adamz"], "unknown --opt"),
    "bad bool": (["--eval", "maybe"], "boolean value expected"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(case, trained, truncated, capsys):
    argv, expected = BAD_INPUTS[case]
    out, _ = trained
    argv = [a.format(ckpt=out / "checkpoint-0.pth", cut=truncated) for a in argv]
    assert main.cli([*FAST, "--epochs", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback of a machine without CUDA")
def test_cuda_falls_back_to_cpu_with_a_warning(caplog):
    args = main.parse_args(["--device", "cuda"])
    with caplog.at_level(logging.WARNING):
        assert main.resolve_device(args).type == "cpu"
    assert args.device == "cpu" and "CUDA is not available" in caplog.text
    args = main.parse_args(["--device", "cuda", "--use_amp", "true"])
    main.resolve_device(args)
    assert args.amp_dtype == "bf16"


@pytest.mark.cli
def test_stock_timm_model_trains_and_resumes_by_its_saved_name(tmp_path, capsys):
    out = tmp_path / "resnet"
    argv = ["--model", "resnet18", "--epochs", "1", "--output_dir", str(out), "--layer_decay", "0.9",
            "--mixup", "0", "--cutmix", "0", *FAST]
    assert main.cli(argv) == 0
    ckpt = load_checkpoint_file(out / "checkpoint-0.pth")
    assert "arch" not in ckpt and ckpt["args"]["model"] == "resnet18"
    capsys.readouterr()
    # no --model: not a ConvNeXt layout, so the name saved in the checkpoint's args is used
    assert main.cli(["--eval", "true", "--resume", str(out / "checkpoint-0.pth"), *FAST]) == 0
    stdout = capsys.readouterr().out
    assert "--model resnet18, as saved" in stdout
    assert acc1_printed(stdout) == pytest.approx(ckpt["max_accuracy"], abs=1e-3)
