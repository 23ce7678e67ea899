"""scripts/export.py: every family and a pruned shape to ONNX, parity in ONNX Runtime, dynamic
batch and size, inference from the .onnx file, clear errors."""
import os
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from cli import export
from cli import inference
import models
from checkpoints.io import save_checkpoint_file
from cli.prune import main as prune_main

ARCHS = {
    "convnext": {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "num_classes": 10},
    "convnext_isotropic": {"family": "convnext_isotropic", "depth": 2, "dim": 16, "num_classes": 10},
    "resnet_cifar": {"family": "resnet_cifar", "depths": [1, 1, 1], "inner": None, "num_classes": 10},
    "vgg_cifar": {"family": "vgg_cifar", "cfg": [8, "M", 16, "M", 16], "num_classes": 10},
}


def checkpoint_of(tmp_path, arch, name="src.pth"):
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    path = tmp_path / name
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"input_size": 32, "data_set": "DIGITS"}}, path)
    return path, model


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


@pytest.mark.cli
@pytest.mark.parametrize("family", list(ARCHS))
def test_every_family_exports_with_parity_and_a_dynamic_batch(tmp_path, family, capsys):
    src, model = checkpoint_of(tmp_path, ARCHS[family])
    out = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(src), "--output", str(out), "--parity_images", "8"]) is None
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images).numpy()
        assert np.abs(run_onnx(out, images) - expected).max() <= 1e-4


@pytest.mark.cli
def test_pruned_checkpoint_and_dynamic_size(tmp_path):
    src, _ = checkpoint_of(tmp_path, ARCHS["convnext"])
    pruned = tmp_path / "pruned.pth"
    assert prune_main(["--checkpoint", str(src), "--output", str(pruned), "--dims", "4", "8", "12", "16"]) == 0
    out = tmp_path / "pruned.onnx"
    export.main(["--checkpoint", str(pruned), "--output", str(out), "--dynamic_size",
                 "--data_set", "DIGITS", "--parity_images", "8"])
    model = models.build_model(models.infer_arch(torch.load(pruned, weights_only=True)["model"])).eval()
    model.load_state_dict(torch.load(pruned, weights_only=True)["model"])
    for size in (32, 64):
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert np.abs(run_onnx(out, images) - model(images).numpy()).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["input_size"] == "32" and '"dims": [4, 8, 12, 16]' in meta["arch"]


@pytest.mark.cli
def test_inference_reads_the_onnx_file_like_the_checkpoint(tmp_path, capsys):
    src, _ = checkpoint_of(tmp_path, ARCHS["resnet_cifar"])
    out = tmp_path / "r.onnx"
    export.main(["--checkpoint", str(src), "--output", str(out), "--parity_images", "4"])
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert inference.main(["--image", str(image), "--checkpoint", str(src)]) == 0
    from_torch = capsys.readouterr().out.splitlines()[-5:]
    assert inference.main(["--image", str(image), "--checkpoint", str(out)]) == 0
    from_onnx = capsys.readouterr().out.splitlines()[-5:]
    assert from_torch == from_onnx


def test_bad_input_is_one_line(tmp_path, capsys):
    from common.errors import run_cli
    src, _ = checkpoint_of(tmp_path, ARCHS["vgg_cifar"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    existing = tmp_path / "there.onnx"
    existing.write_bytes(b"keep")
    cases = [
        (["--checkpoint", str(junk), "--output", str(tmp_path / "a.onnx")], "not a PyTorch checkpoint"),
        (["--checkpoint", str(src), "--output", str(tmp_path / "no" / "a.onnx")], "folder does not exist"),
        (["--checkpoint", str(src), "--output", str(existing)], "pass --overwrite"),
        (["--checkpoint", str(src), "--output", str(tmp_path / "a.pth")], "ending in .onnx"),
        (["--checkpoint", str(src), "--output", str(tmp_path / "a.onnx"), "--input_size", "1"],
         "too small"),
    ]
    for argv, message in cases:
        assert run_cli(export.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert existing.read_bytes() == b"keep" and not (tmp_path / "a.onnx").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("arch", [*ARCHS.values(), {**ARCHS["convnext"], "dw": "multiscale"}],
                         ids=[*ARCHS, "convnext_multiscale"])
def test_folding_keeps_the_logits_to_1e5(arch):
    import copy
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))            # affines that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        images = torch.randn(4, 3, 32, 32)
        ref = model(images)
        folded = copy.deepcopy(model).fold()
        out = folded(images)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    norms = [m for m in folded.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
    kept = [m for m in norms if isinstance(m, torch.nn.BatchNorm2d) or m.elementwise_affine]
    assert len(kept) == (1 if arch["family"] == "convnext" else 0)   # only ConvNeXt's stem norm


@pytest.mark.cli
def test_export_of_the_folded_form(tmp_path, capsys):
    src, _ = checkpoint_of(tmp_path, ARCHS["resnet_cifar"])
    out = tmp_path / "folded.onnx"
    export.main(["--checkpoint", str(src), "--output", str(out), "--fold", "--parity_images", "8"])
    text = capsys.readouterr().out
    assert "folded model: max |logit difference|" in text and "top-1 agreement 100.00%" in text
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}


@pytest.mark.e2e
def test_int8_export_keeps_top1_reads_in_inference_and_refuses_a_drop(tmp_path, trained, capsys, monkeypatch):
    """--quantize int8 on the DIGITS-trained 3M: calibrated on training images, compared on the
    evaluation split; inference.py reads the int8 graph; a calibration that saturates every
    activation (images scaled by 1e-3) loses top-1 and is refused without a file."""
    ckpt = trained[0] / "checkpoint-0.pth"
    out = tmp_path / "int8.onnx"
    argv = ["--checkpoint", str(ckpt), "--output", str(out), "--quantize", "int8", "--calib_batches", "2",
            "--parity_images", "8"]
    assert export.main(argv) is None
    text = capsys.readouterr().out
    found = re.search(r"top-1 ([\d.]+)% vs fp32 ([\d.]+)% \(change ([-+][\d.]+) points.*agreement ([\d.]+)%", text)
    int8, fp32, change, agree = map(float, found.groups())
    assert "360 DIGITS evaluation images" in text and "64 DIGITS training images" in text
    assert agree >= 90 and abs(change - (int8 - fp32)) < 0.01
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert '"int8"' == meta["precision"] and any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    img = tmp_path / "digit.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(img)
    assert inference.main(["--image", str(img), "--checkpoint", str(out)]) == 0
    assert "Load ONNX model" in capsys.readouterr().out

    real = export.calibration_batches
    monkeypatch.setattr(export, "calibration_batches",
                        lambda *a: ([(x * 1e-3, y) for x, y in real(*a)[0]], real(*a)[1]))
    bad = tmp_path / "bad.onnx"
    with pytest.raises(export.UserError, match=r"int8 loses [\d.]+ points of top-1 .* not written"):
        export.main([*argv[:3], str(bad), *argv[4:], "--max_drop", "0.5"])
    assert not bad.exists()


@pytest.mark.cli
@pytest.mark.parametrize("argv, message", [
    (["--calib_batches", "4"], "apply to --quantize int8"),
    (["--quantize", "int8", "--max_drop", "-1"], "--max_drop must be >= 0"),
    (["--quantize", "int8", "--calib_batch_size", "0"], "--calib_batch_size must be >= 1"),
    (["--quantize", "int8", "--format", "timm"], "apply to --format onnx"),
])
def test_int8_flags_are_checked_first(tmp_path, argv, message):
    with pytest.raises(export.UserError, match=message):
        export.main(["--checkpoint", str(tmp_path / "none.pth"), "--output", str(tmp_path / "o.onnx"), *argv])
