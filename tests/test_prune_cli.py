"""pruning/prune_convnext.py end to end: our and released checkpoints, outputs, bad input."""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import models
from cli.prune import main
from checkpoints.io import load_checkpoint_file, save_checkpoint_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"family": "convnext", "depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 10}


def small_model(seed=0):
    torch.manual_seed(seed)
    model = models.build_model(ARCH, layer_scale_init_value=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint in our training format (arch, EMA, optimizer state)."""
    model = small_model()
    sd = model.state_dict()
    path = tmp_path / "source.pth"
    save_checkpoint_file({"model": sd, "model_ema": {k: v * 1.01 for k, v in sd.items()},
                          "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "epoch": 2,
                          "args": {"model": "custom", "input_size": 32}, "arch": model.arch,
                          "max_accuracy": 40.0}, path)
    return path


@pytest.mark.e2e
def test_cli_script_end_to_end(ckpt, tmp_path):
    out, scores = tmp_path / "pruned.pth", tmp_path / "scores.json"
    cmd = [sys.executable, "pruning/prune_convnext.py", "--checkpoint", str(ckpt), "--output", str(out),
           "--criterion", "opnorm", "--dims", "4", "8", "16", "16", "--hidden_ratio", "0.5",
           "--input_size", "32", "--export_scores", str(scores)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "params" in run.stdout and "MACs @32px" in run.stdout and "4,8,16,16" in run.stdout
    pruned = load_checkpoint_file(out)
    assert set(pruned) == {"model", "model_ema", "args", "arch", "pruning"}
    assert pruned["arch"]["dims"] == [4, 8, 16, 16]
    assert pruned["arch"]["hidden"] == [[16], [32], [48, 48], [64]]
    record = pruned["pruning"]
    assert record["criterion"] == "opnorm" and record["options"]["hidden_ratio"] == [0.5]
    assert record["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    model = models.build_model(pruned["arch"])
    model.load_state_dict(pruned["model"], strict=True)
    model.load_state_dict(pruned["model_ema"], strict=True)
    data = json.loads(scores.read_text())
    group = data["groups"]["stages.1.residual"]
    assert group["width"] == 16 and len(group["score"]) == 16 and len(group["kept"]) == 8
    # opnorm's default aggregation reads every weight and scale slice of the group
    assert (record["options"]["scope"], record["options"]["normalize"], record["options"]["reduce"]) == \
        ("group", "mean", "max")
    assert len(group["sources"]) > 3 and all(len(v) == 16 for v in group["sources"].values())


@pytest.mark.e2e
def test_output_evaluates_with_main_without_model(ckpt, tmp_path):
    if not os.path.exists(os.path.join(REPO, "main.py")):
        pytest.skip("main.py is not in this checkout")
    out = tmp_path / "pruned.pth"
    assert main(["--checkpoint", str(ckpt), "--output", str(out), "--dims", "4", "8", "8", "8",
                 "--mlp_ratio", "4"]) == 0
    cmd = [sys.executable, "main.py", "--eval", "true", "--resume", str(out), "--data_set", "DIGITS",
           "--input_size", "32", "--batch_size", "128", "--device", "cpu", "--num_workers", "0",
           "--output_dir", "", "--log_dir", ""]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.cli
def test_released_format_and_model_flag(tmp_path):
    model = models.create_model("convnext_tiny_3M_pruned_cifar10")
    src = tmp_path / "released.pth"
    save_checkpoint_file({"model": model.state_dict(), "args": argparse.Namespace(lr=4e-3)}, src)
    for i, extra in enumerate([[], ["--model", "convnext_tiny_3M_pruned_cifar10"]]):
        out = tmp_path / f"out{i}.pth"
        assert main(["--checkpoint", str(src), "--output", str(out), "--criterion", "l1",
                     "--dims", "16", "32", "64", "128", "--mlp_ratio", "4", *extra]) == 0
        pruned = load_checkpoint_file(out)
        assert pruned["args"] == {"lr": 4e-3} and "model_ema" not in pruned
        assert sum(v.numel() for v in pruned["model"].values()) == \
            sum(p.numel() for p in models.build_model(pruned["arch"]).parameters())
        assert pruned["arch"]["dims"] == [16, 32, 64, 128]


@pytest.mark.e2e
def test_targets_and_dry_run(ckpt, tmp_path, capsys):
    out, scores = tmp_path / "never.pth", tmp_path / "scores.json"
    before = sorted(os.listdir(tmp_path))
    assert main(["--checkpoint", str(ckpt), "--output", str(out), "--target_params", "20K",
                 "--round_to", "4", "--dry_run"]) == 0
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert "dry run" in capsys.readouterr().out
    assert main(["--checkpoint", str(ckpt), "--dry_run", "--ratio", "0.3", "--criterion", "fpgm",
                 "--export_scores", str(scores)]) == 0
    assert json.loads(scores.read_text())["provenance"]["criterion"] == "fpgm"
    assert main(["--checkpoint", str(ckpt), "--output", str(out), "--target_macs", "100K",
                 "--input_size", "32", "--use_ema", "--criterion", "random", "--seed", "7"]) == 0
    pruned = load_checkpoint_file(out)
    assert pruned["pruning"]["scored_weights"] == "model_ema"


@pytest.mark.cli
@pytest.mark.parametrize("argv,message", [
    (["--dims", "4", "8", "16", "64"], "only 32 channels"),
    (["--dims", "4", "0", "16", "16"], "--dims must be >= 1, got 0"),
    (["--dims", "4", "8", "16"], "takes 4 values"),
    (["--criterion", "hrank"], "unknown criterion"),
    (["--target_params", "10"], "cannot be met"),
    (["--hidden_ratio", "1.5"], "(0, 1]"),
    (["--use_ema", "--model", "resnet18", "--ratio", "0.5"], "the weights do not fit timm resnet18"),
    ([], "no keep rule"),
    (["--ratio", "0.5", "--export_scores", "{out}"], "--output and --export_scores name the same file"),
    (["--dims", "4", "x"], "invalid int value"),
    (["--target_macs", "lots"], "not a count"),
    (["--input_size", "8", "--ratio", "0.5"], "--input_size 8 is too small for ConvNeXt"),
])
def test_bad_input(ckpt, tmp_path, capsys, argv, message):
    out = tmp_path / "out.pth"
    argv = [a.format(out=out) for a in argv]
    assert main(["--checkpoint", str(ckpt), "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.cli
def test_bad_paths(ckpt, tmp_path, capsys):
    existing = tmp_path / "existing.pth"
    existing.write_bytes(b"keep me")
    cases = [([str(ckpt), str(ckpt)], "is the input checkpoint"),
             ([str(ckpt), str(tmp_path)], "is a folder; give a file name"),
             ([str(ckpt), str(existing)], "pass --overwrite"),
             ([str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")], "checkpoint not found")]
    for (src, dst), message in cases:
        assert main(["--checkpoint", src, "--output", dst, "--dims", "4", "8", "8", "8"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err
    assert existing.read_bytes() == b"keep me"
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path), "--dims", "4", "8", "8", "8",
                 "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--output", str(existing), "--dims", "4", "8", "8", "8",
                 "--overwrite"]) == 0
    assert load_checkpoint_file(existing)["arch"]["dims"] == [4, 8, 8, 8]


@pytest.mark.cli
@pytest.mark.parametrize("arch, rule, expect", [
    ({"family": "convnext_isotropic", "depth": 2, "dim": 16, "num_classes": 10}, ["--dims", "8"],
     {"dim": 8, "hidden": [32, 32]}),
    ({"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "dw": "multiscale",
      "num_classes": 10}, ["--dims", "4", "8", "12", "16"], {"dims": [4, 8, 12, 16]}),
])
def test_other_convnext_families_end_to_end(tmp_path, arch, rule, expect):
    model = models.build_model(arch)
    src, out = tmp_path / "src.pth", tmp_path / "out.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, src)
    assert main(["--checkpoint", str(src), "--output", str(out), "--input_size", "32", *rule]) == 0
    pruned = load_checkpoint_file(out)
    assert {k: pruned["arch"][k] for k in expect} == expect
    models.build_model(pruned["arch"]).load_state_dict(pruned["model"], strict=True)


@pytest.mark.cli
def test_aggregation_defaults_per_criterion_and_flags_override(ckpt, tmp_path):
    base = ["--checkpoint", str(ckpt), "--dry_run", "--ratio", "0.3", "--input_size", "32"]
    for argv, expected in [(["--criterion", "opnorm"], ("group", "mean", "max")),
                           (["--criterion", "l1"], ("producers", "max", "mean")),
                           (["--criterion", "opnorm", "--scope", "producers", "--reduce", "mean"],
                            ("producers", "mean", "mean"))]:
        scores = tmp_path / f"{len(argv)}.json"
        assert main(base + argv + ["--export_scores", str(scores), "--overwrite"]) == 0
        options = json.loads(scores.read_text())["provenance"]["options"]
        assert (options["scope"], options["normalize"], options["reduce"]) == expected
