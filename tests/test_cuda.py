"""The CUDA tier: what only a GPU executes (pytest -m cuda; skipped without one, and left out
of the default CPU run). fp16 with the gradient scaler, clipping and accumulation across a
resume, bf16, channels_last, compile, EMA, NCCL under torchrun, the pinned-memory loader,
CPU / GPU parity and export from a CUDA-trained checkpoint, all on DIGITS at 32 px."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import utils
from checkpoints.identity import load_held_model
from checkpoints.io import load_checkpoint_file
from helpers import ROOT

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MODEL = "convnext_tiny_3M_pruned_cifar10"
DATA = ["--data_set", "DIGITS", "--input_size", "32", "--batch_size", "64", "--warmup_epochs", "0",
        "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--lr", "2e-3", "--device", "cuda"]


def run(*argv, launcher=(), timeout=900):
    cmd = [sys.executable, *launcher, str(ROOT / "main.py"), *map(str, argv)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """fp16 + GradScaler, clipping, accumulation, EMA, channels_last, pinned loader workers:
    one epoch, then a resume to two."""
    out = tmp_path_factory.mktemp("fp16") / "run"
    flags = ["--model", MODEL, *DATA, "--use_amp", "true", "--amp_dtype", "fp16", "--clip_grad", "1",
             "--update_freq", "2", "--model_ema", "true", "--model_ema_eval", "true", "--channels_last", "true",
             "--pin_mem", "true", "--num_workers", "2", "--output_dir", out]
    run("--epochs", 1, *flags)
    first = load_checkpoint_file(out / "checkpoint-0.pth")
    resumed = run("--epochs", 2, *flags)
    return out, first, resumed


def test_fp16_scaler_state_is_saved_and_restored_on_resume(fp16_run):
    out, first, resumed = fp16_run
    assert first["scaler"] and first["scaler"]["scale"] > 0
    scaler = utils.NativeScaler(enabled=True, device="cuda")
    scaler.load_state_dict(first["scaler"])
    assert scaler.state_dict()["scale"] == first["scaler"]["scale"]
    assert "Resume" in resumed or "resum" in resumed.lower()
    rows = log(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["train_loss"] == r["train_loss"] for r in rows)
    assert load_checkpoint_file(out / "checkpoint-1.pth")["model_ema"] is not None


@pytest.mark.e2e
def test_bf16_compile_trains_and_evaluates(tmp_path):
    out = tmp_path / "bf16"
    text = run("--model", MODEL, *DATA, "--use_amp", "true", "--amp_dtype", "bf16", "--compile", "true",
               "--channels_last", "true", "--epochs", 1, "--num_workers", "2", "--output_dir", out)
    assert "* Acc@1" in text and log(out)[0]["test_acc1"] > 10


@pytest.mark.e2e
def test_ddp_with_nccl_at_world_size_one_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    text = run("--model", MODEL, *DATA, "--epochs", 1, "--num_workers", "2", "--output_dir", out,
               launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"))
    assert re.search(r"distributed init \(rank 0 of 1\).*nccl", text), text[-2000:]
    assert (out / "checkpoint-0.pth").exists()


@pytest.mark.e2e
def test_eval_parity_cpu_and_gpu(fp16_run):
    out, _, _ = fp16_run
    model, _ = load_held_model(str(out / "checkpoint-1.pth"))
    model.eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    try:
        with torch.no_grad():
            cpu = model(x)
            gpu = model.cuda()(x.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert (gpu - cpu).abs().max() <= 1e-3 * cpu.abs().max()
    cpu_top1 = run("--eval", "true", "--resume", out / "checkpoint-1.pth", "--data_set", "DIGITS",
                   "--device", "cpu", "--num_workers", "0")
    gpu_top1 = run("--eval", "true", "--resume", out / "checkpoint-1.pth", "--data_set", "DIGITS",
                   "--device", "cuda", "--num_workers", "2")
    acc = [float(re.findall(r"\* Acc@1 ([\d.]+)", t)[-1]) for t in (cpu_top1, gpu_top1)]
    assert abs(acc[0] - acc[1]) <= 100 / 360 + 1e-6  # at most one of the 360 images


@pytest.mark.e2e
def test_export_of_a_cuda_trained_checkpoint(fp16_run, tmp_path):
    out, _, _ = fp16_run
    onnx = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/export.py"), "--checkpoint", str(out / "checkpoint-1.pth"),
                           "--output", str(onnx)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert onnx.stat().st_size > 1e6
    arch = load_checkpoint_file(out / "checkpoint-1.pth")["arch"]
    assert models.count_arch(arch, 32)[0] == 3_181_098
