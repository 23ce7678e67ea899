"""A model as a folder in timm's Hub layout: model.safetensors, config.json, README.md.

    timm.create_model("local-dir:DIR", pretrained=True)       # or hf-hub:ORG/NAME once uploaded

Shapes timm's own class builds (the family's `timm_export`: the Efficient ConvNeXt shapes)
get timm's key layout and architecture name, and load with timm alone; any other shape is
written in our layout under models.ARCH_FACTORY with its `arch`, and loads once `models` is
imported. The folder is built beside its target and checked (logits of the folder, loaded the
way a user loads it, against the model's) before it replaces anything; only the three files
are ever replaced.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)

import models
from checkpoints.io import save_weights_file
from common.errors import UserError, first_line
from common.files import TEMP_PREFIX, atomic_open

FILES = ("model.safetensors", "config.json", "README.md")
# The training flags a published folder keeps (what reading it needs; no paths of this machine).
SHARED_ARGS = ("model", "data_set", "nb_classes", "input_size", "crop_pct", "imagenet_default_mean_and_std")


@dataclass(frozen=True)
class Layout:
    """How a shape is written: timm's `architecture`, its `model_args`, the weights in that
    layout, and whether timm alone builds it."""
    architecture: str
    model_args: dict
    state: dict
    timm_only: bool


def layout(arch, state):
    """timm's own layout where its class builds the shape, else ours under ARCH_FACTORY."""
    found = models.timm_export(arch, state)
    if found is None and arch.get("family") == "traced":
        raise UserError(f"{models.describe_arch(arch)}: timm's own class cannot build this shape (timm names "
                        "take no per-layer widths); export ONNX, or share the .pth / .safetensors, which "
                        "pruning.load rebuilds")
    if found is not None:
        return Layout(*found, timm_only=True)
    return Layout(models.ARCH_FACTORY, {"arch": arch}, dict(state), timm_only=False)


def pretrained_cfg(data_args, num_classes, in_chans, classifier):
    """timm's pretrained_cfg for the evaluation transform the model was trained with."""
    size = data_args.input_size
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if data_args.imagenet_default_mean_and_std
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    crop_pct = 1.0 if size <= 32 or size >= 384 else (data_args.crop_pct or 224 / 256)
    return {"input_size": [in_chans, size, size], "fixed_input_size": False, "interpolation": "bicubic",
            "crop_pct": crop_pct, "crop_mode": "squash" if size >= 384 else "center",
            "mean": list(mean), "std": list(std), "num_classes": num_classes, "classifier": classifier}


def write_folder(model, held, folder, data_args, *, source_sha256=None, accuracy=None, overwrite=False,
                 tolerance=1e-5):
    """Write `model` (from the checkpoint `held`) as a timm Hub folder; returns its Layout.

    Args:
        data_args: the evaluation transform (input size, crop, normalisation) for the config.
        source_sha256: of the checkpoint file, for the model card.
        accuracy: (top-1 percent, images, data set name) for the model card, or None.
        overwrite: replace our three files in an existing folder (nothing else is touched).
        tolerance: largest accepted |logit difference| of the folder against the model, times
            the largest |logit| when that exceeds 1.
    """
    check_target(folder, overwrite)
    arch = model.arch
    out = layout(arch, {k: v.detach() for k, v in model.state_dict().items()})
    if arch.get("family") == "traced":
        classifier = (arch.get("head") or "").rpartition(".")[0] or None
    else:
        classifier = "head.fc" if out.timm_only else type(model).head_key
    config = {"architecture": out.architecture, "num_classes": arch["num_classes"],
              "model_args": out.model_args,
              "pretrained_cfg": pretrained_cfg(data_args, arch["num_classes"], arch.get("in_chans", 3), classifier)}
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.path.basename(os.path.abspath(folder))}-", dir=parent)
    try:
        shared = {k: v for k, v in held.trained.items() if k in SHARED_ARGS}  # no local paths
        record = held.ckpt.get("pruning") if isinstance(held.ckpt, dict) else None
        save_weights_file({"arch": arch, "args": shared, "pruning": record, "model": out.state},
                          os.path.join(tmp, FILES[0]))
        with atomic_open(os.path.join(tmp, FILES[1])) as f:
            json.dump(config, f, indent=2)
        with atomic_open(os.path.join(tmp, FILES[2])) as f:
            f.write(model_card(held, arch, out, data_args.input_size, source_sha256, accuracy))
        check_folder(tmp, model, data_args.input_size, out.timm_only, tolerance)
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_target(folder, overwrite):
    """Refuse a file, or a folder holding anything without --overwrite."""
    if os.path.isfile(folder):
        raise UserError(f"--output {folder} is a file; give a folder for --format timm")
    if not folder:
        raise UserError("--output: give a folder name (it is empty)")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise UserError(f"--output {folder} is not empty; pass --overwrite to replace its "
                        f"{', '.join(FILES)} (other files are left alone)")


def _install(tmp, folder):
    """Move the checked files into place: the whole folder at once when it is new."""
    if not os.path.exists(folder):
        os.replace(tmp, folder)
        return
    for name in FILES:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))


_TIMM_ONLY_CHECK = """
import sys, timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert not any(m == "models" or m.startswith("models.") for m in sys.modules), "imported the project"
with torch.no_grad():
    logits = model(load_file(sys.argv[2])["images"])
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(type(model).__module__ + "." + type(model).__name__)
"""


def check_folder(folder, model, input_size, timm_only, tolerance):
    """The folder, loaded as a user would (timm alone in a fresh Python where timm's class
    builds it, else timm with our factories here), gives the model's logits."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    images = torch.randn(4, model.arch.get("in_chans", 3), input_size, input_size)
    if timm_only:
        paths = [os.path.join(folder, n) for n in ("images.tmp.safetensors", "logits.tmp.safetensors")]
        save_file({"images": images}, paths[0])
        proc = subprocess.run([sys.executable, "-I", "-c", _TIMM_ONLY_CHECK, folder, *paths],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"timm alone cannot load the exported folder ({first_line(last)}): not written")
        got = load_file(paths[1])["logits"]
        for p in paths:
            os.remove(p)
    else:
        import timm
        with torch.no_grad():
            got = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
    with torch.no_grad():
        ref = model.eval()(images)
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    if diff > tolerance * max(1.0, scale):
        raise UserError(f"the exported folder gives other logits (max |difference| {diff:.3g}): not written")
    return diff


def model_card(held, arch, out, input_size, source_sha256, accuracy):
    """README.md: how to load it, where it comes from, its size, its accuracy if measured."""
    params, macs = models.count_arch(arch, input_size)
    record = held.ckpt.get("pruning") if isinstance(held.ckpt, dict) else None
    load = (["import timm  # timm alone builds this shape"] if out.timm_only else
            ["import models  # Efficient ConvNeXt's factories: timm's own classes do not build this shape",
             "import timm"])
    lines = ["---", "library_name: timm", "tags: [image-classification, timm, pruning, efficient-convnext]",
             "---", "", f"# {held.label}", "",
             f"{models.describe_arch(arch)}, written by Efficient ConvNeXt (scripts/export.py --format timm).",
             "", "## Load", "", "```python", *load,
             'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:ORG/NAME"',
             "```", "", "## Provenance", "",
             f"- exported from a checkpoint with sha256 `{source_sha256 or 'unknown (not a file)'}`"]
    if record:
        options = {k: v for k, v in (record.get("options") or {}).items() if v is not None}
        lines += [f"- pruned by criterion `{record.get('criterion')}` from {record.get('source')} "
                  f"(sha256 `{record.get('source_sha256')}`), options `{json.dumps(options)}`"]
    if held.trained.get("data_set"):
        lines += [f"- trained on {held.trained['data_set']} at {held.input_size()} px"]
    lines += [f"- {params:,} parameters, {macs:,} MACs at {input_size} px"]
    if accuracy is not None:
        top1, n, data_set = accuracy
        lines += [f"- top-1 {top1:.2f}% on {n:,} evaluation images of {data_set} (one evaluation)"]
    return "\n".join(lines) + "\n"
