#!/usr/bin/env python
"""Export a checkpoint of any family (any pruned shape) to ONNX, checked in ONNX Runtime, or
to a folder in timm's Hub layout, checked in timm.

    python scripts/export.py --checkpoint pruned_13M.pth --output pruned_13M.onnx --data_set DIGITS
    python scripts/export.py --checkpoint pruned_13M.pth --format timm --output pruned_13M/ --data_set DIGITS

--format timm (hub.py) writes model.safetensors, config.json and a README.md model card; the
Efficient ConvNeXt shapes load with timm alone (timm.create_model("local-dir:DIR",
pretrained=True)), others once this project's `models` is imported. With --data_set the card
carries the top-1 measured on its evaluation split.

ONNX:
The shape comes from the checkpoint (`arch`, else its weights, else its saved --model) and the
input size from the size it was trained at (or --input_size). The batch axis is dynamic
(--dynamic_size makes height and width dynamic too). torch's exporter writes opset 18, where
LayerNorm is one operator; onnx.checker runs its full check; then the same images go through
PyTorch and ONNX Runtime: real ones from --data_set (its evaluation split) or random ones, and
the max |logit difference| and top-1 agreement are printed. Above --tolerance (times the
largest |logit| when that exceeds 1) the export fails (exit status 2) and no file is written
under --output. The file carries
the checkpoint's input size, normalisation and arch as metadata (scripts/inference.py reads
them).

--quantize int8 writes ONNX Runtime's static int8 quantization of that checked graph instead
(QDQ, int8 weights per output channel, uint8 activations calibrated on --calib_batches x
--calib_batch_size training images of --data_set, default the checkpoint's own data; depthwise
convs stay fp32). Both graphs then classify the whole evaluation split (or --eval_images of it):
the top-1 of each, the change and their top-1 agreement are printed, and the int8 file is not
written when top-1 falls by more than --max_drop points.

    python scripts/export.py --checkpoint pruned_3M.pth --output pruned_3M_int8.onnx --quantize int8
"""
import copy
import json
import os
import sys
import tempfile


from checkpoints.sources import set_download_timeout
from cli.flags import DATA_SETS, add_download_flag
from common.errors import ArgumentParser, UserError, parse_first, run_cli
from common.files import atomic_path, check_output_file, sha256_file
from deploy.runtime import graph_runner, onnx_modules, quantize_int8

QUANTIZE = ("none", "int8")


def get_args_parser():
    p = ArgumentParser("export", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint: a .pth / .safetensors file, an http(s) URL or hf-hub:ORG/NAME")
    p.add_argument("--format", default="onnx", choices=("onnx", "timm"),
                   help="onnx: one .onnx file; timm: a folder in timm's Hub layout")
    p.add_argument("--output", required=True, help="the .onnx file (--format timm: the folder) to write")
    p.add_argument("--model", default=None, help="registered model name, when the checkpoint does not say")
    p.add_argument("--input_size", type=int, default=None,
                   help="image side (default: the checkpoint's training size, else 224)")
    p.add_argument("--dynamic_size", action="store_true", help="dynamic height and width too")
    p.add_argument("--fold", action="store_true",
                   help="export the inference form: norm affines folded into the next layer "
                        "(LayerNorm) or the previous conv (BatchNorm), checked against the "
                        "unfolded model to 1e-5 of the largest |logit| first")
    p.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="real images for the parity check (default: random images)")
    p.add_argument("--data_path", default=None, help="data set folder for --data_set")
    p.add_argument("--eval_data_path", default=None, help="evaluation folder for --data_set")
    p.add_argument("--parity_images", type=int, default=64, help="images in the parity check")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted |logit difference|, times the largest |logit| when that "
                        "is above 1 (fp32 rounding grows with the magnitude); default 1e-4 for "
                        "ONNX, 1e-5 for the timm folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (--format timm: only its three files)")
    q = p.add_argument_group("int8 (--quantize int8)")
    q.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="int8: write ONNX Runtime's static int8 quantization of the graph")
    q.add_argument("--calib_batches", type=int, default=8, help="training batches that calibrate it")
    q.add_argument("--calib_batch_size", type=int, default=32, help="images per calibration batch")
    q.add_argument("--eval_images", type=int, default=None,
                   help="evaluation images both graphs classify (default: the whole split)")
    q.add_argument("--max_drop", type=float, default=1.0,
                   help="largest accepted fall of top-1, in points, from fp32 to int8")
    q.add_argument("--seed", type=int, default=0, help="which training images calibrate")
    add_download_flag(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import datasets  # noqa: E402
import models  # noqa: E402
from checkpoints import timm_folder as hub  # noqa: E402
from checkpoints.identity import load_held_model  # noqa: E402
from checkpoints.sources import local_copy  # noqa: E402
from deploy.runtime import onnx_graph_sha256  # noqa: E402
from engine import evaluate  # noqa: E402
from pruning.calibration import calibration_batches  # noqa: E402
from deploy.runners import OPSET, export_onnx  # noqa: E402


def check_args(args):
    set_download_timeout(args.download_timeout)
    if args.tolerance is None:
        args.tolerance = 1e-5 if args.format == "timm" else 1e-4
    if not args.tolerance > 0:
        raise UserError("--tolerance must be > 0")
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input_size must be >= 1, got {args.input_size}")
    if args.data_path and not args.data_set:
        raise UserError("--data_path needs --data_set")
    if args.format == "timm":
        given = [f for f, on in (("--fold", args.fold), ("--dynamic_size", args.dynamic_size),
                                 ("--parity_images", args.parity_images != 64),
                                 ("--quantize", args.quantize != "none")) if on] + _int8_flags_given(args)
        if given:
            raise UserError(f"{', '.join(given)} apply to --format onnx (a timm folder holds the "
                            "unfolded weights and is checked on 4 random images)")
        hub.check_target(args.output, args.overwrite)
        return
    if not args.output.endswith(".onnx"):
        raise UserError(f"--output {args.output}: give a file name ending in .onnx")
    check_output_file(args.output, "--output", args.overwrite)
    if args.parity_images < 1:
        raise UserError("--parity_images must be >= 1")
    check_quantize_args(args)


def _int8_flags_given(args):
    """The --quantize int8 flags set away from their defaults."""
    return [f for f, on in (("--calib_batches", args.calib_batches != 8),
                            ("--calib_batch_size", args.calib_batch_size != 32),
                            ("--eval_images", args.eval_images is not None),
                            ("--max_drop", args.max_drop != 1.0), ("--seed", args.seed != 0)) if on]


def check_quantize_args(args):
    given = _int8_flags_given(args)
    if args.quantize == "none":
        if given:
            raise UserError(f"{', '.join(given)} apply to --quantize int8")
        return
    for name in ("calib_batches", "calib_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eval_images is not None and args.eval_images < 1:
        raise UserError(f"--eval_images must be >= 1, got {args.eval_images}")
    if not args.max_drop >= 0:
        raise UserError(f"--max_drop must be >= 0 points, got {args.max_drop}")


def load_model(args):
    """(model in eval mode, display name, the checkpoint's training args)."""
    model, held = load_held_model(args.checkpoint, args.model)
    return model.eval(), held.label, held


def parity_images(args, data_args, n):
    """n images as the evaluation transform gives them: from --data_set, else random."""
    if args.data_set is None:
        torch.manual_seed(0)
        return torch.randn(n, 3, data_args.input_size, data_args.input_size), "random images"
    dataset, _ = datasets.build_dataset(is_train=False, args=data_args)
    n = min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)]), f"{args.data_set} evaluation images"


def fold(model, images):
    """The model's inference form, refused unless it matches the model to 1e-5 (relative)."""
    folded = models.fold(copy.deepcopy(model)).eval()
    with torch.no_grad():
        ref, out = model(images), folded(images)
    diff, scale = float((out - ref).abs().max()), float(ref.abs().max())
    print(f"folded model: max |logit difference| {diff:.3g} against the unfolded one")
    if diff > 1e-5 * max(1.0, scale):
        raise UserError(f"folding changed the logits by {diff:.3g}: not exported")
    return folded


def add_metadata(onnx, path, meta):
    m = onnx.load(path)
    meta = {**meta, "graph_sha256": onnx_graph_sha256(m)}
    del m.metadata_props[:]  # the quantizer's own marks (not JSON) give way to ours
    for key, value in meta.items():
        m.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(m, path)
    onnx.checker.check_model(path, full_check=True)


def run_graph(run, images, batch=16):
    """Logits of a runtime.graph_runner over a tensor of images, in batches."""
    return np.concatenate([run(images[i:i + batch].numpy()) for i in range(0, len(images), batch)])


def parity(path, model, images):
    """(max |logit difference|, largest |logit|, top-1 agreement): ONNX Runtime vs PyTorch."""
    onnx_out = run_graph(graph_runner(path, 0), images)
    with torch.no_grad():
        torch_out = model(images).numpy()
    diff = float(np.abs(onnx_out - torch_out).max())
    agree = float((onnx_out.argmax(1) == torch_out.argmax(1)).mean())
    return diff, float(np.abs(torch_out).max()), agree


def export_timm(args, model, name, held, data_args):
    """--format timm: the folder (hub.write_folder), with the top-1 on --data_set for its card."""
    if getattr(model, "arch", None) is None:
        raise UserError(f"--format timm writes this toolkit's families; {name} is a stock timm "
                        "model (save it with timm's own tools)")
    accuracy = None
    if args.data_set:
        dataset, _ = datasets.build_dataset(is_train=False, args=data_args)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        stats = evaluate(loader, model, torch.device("cpu"))
        accuracy = (stats["acc1"], stats["num_images"], args.data_set)
        print(f"top-1 {stats['acc1']:.2f}% on {stats['num_images']} {args.data_set} evaluation images")
    local = local_copy(args.checkpoint)
    out = hub.write_folder(model, held, args.output, data_args, source_sha256=sha256_file(local),
                           accuracy=accuracy, overwrite=args.overwrite, tolerance=args.tolerance)
    who = "timm alone" if out.timm_only else "timm once `import models` has run"
    print(f"{name} written to {args.output}/ ({', '.join(hub.FILES)}) as {out.architecture}; "
          f"checked: {who} loads it with the same logits")


def quantize(args, held, fp32_path, dst):
    """--quantize int8: `fp32_path` quantized into `dst`, calibrated on training images; both
    graphs classify the evaluation split; refused above --max_drop. Returns its metadata."""
    data = held.data_args(args.data_set, args.data_path, args.input_size)
    if args.eval_data_path:
        data = data.replace(eval_data_path=args.eval_data_path)
    calib, n_calib = calibration_batches(data, args.calib_batches, args.calib_batch_size, args.seed)
    n_int8, n_fp32 = quantize_int8(fp32_path, dst, [x.numpy() for x, _ in calib])
    dataset, _ = datasets.build_dataset(is_train=False, args=data)
    n = min(args.eval_images or len(dataset), len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    runs = graph_runner(fp32_path, 0), graph_runner(dst, 0)
    right, agree = [0, 0], 0
    for images, labels in torch.utils.data.DataLoader(subset, batch_size=32):
        fp, q = (run_graph(run, images, 32).argmax(1) for run in runs)
        right[0] += int((fp == labels.numpy()).sum())
        right[1] += int((q == labels.numpy()).sum())
        agree += int((fp == q).sum())
    top1 = [100 * r / n for r in right]
    drop = top1[0] - top1[1]
    change = top1[1] - top1[0]  # not -drop: no "-0.00"
    print(f"int8: {n_int8} ops quantized ({n_fp32} depthwise convs kept fp32), calibrated on "
          f"{n_calib} {data.data_set} training images")
    print(f"int8 on {n} {data.data_set} evaluation images: top-1 {top1[1]:.2f}% vs fp32 {top1[0]:.2f}% "
          f"(change {change:+.2f} points; one image is {100 / n:.2f}), top-1 agreement {agree / n:.2%}")
    if drop > args.max_drop:
        raise UserError(f"int8 loses {drop:.2f} points of top-1 (more than --max_drop {args.max_drop:g}): "
                        f"{args.output} not written")
    return {"precision": "int8", "calibration": {"data_set": data.data_set, "images": n_calib, "seed": args.seed},
            "top1_fp32": top1[0], "top1_int8": top1[1], "eval_images": n}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    onnx, _ = onnx_modules() if args.format == "onnx" else (None, None)
    model, name, held = load_model(args)
    if args.quantize == "int8" and not (args.data_set or held.trained.get("data_set")):
        raise UserError(f"{name} does not record the data it was trained on: --quantize int8 needs "
                        "--data_set (and --data_path) for its calibration and evaluation images")
    # DIGITS only names the transform when no --data_set is given (the images are random)
    data_args = held.data_args(args.data_set or "DIGITS", args.data_path, args.input_size)
    data_args = data_args.replace(eval_data_path=args.eval_data_path)
    size = data_args.input_size
    held.check_size(size, batch_size=args.parity_images if args.format == "onnx" else 4)
    if args.format == "timm":
        return export_timm(args, model, name, held, data_args)
    images, source = parity_images(args, data_args, args.parity_images)
    exported = fold(model, images) if args.fold else model
    meta = {"input_size": size, "crop_pct": data_args.crop_pct,
            "imagenet_default_mean_and_std": data_args.imagenet_default_mean_and_std,
            "arch": getattr(model, "arch", None), "model": name, "data_set": held.trained.get("data_set"),
            "folded": args.fold, "dynamic_size": args.dynamic_size, "precision": "fp32"}
    with atomic_path(args.output, suffix=".onnx") as tmp, tempfile.TemporaryDirectory() as work:
        fp32 = tmp if args.quantize == "none" else os.path.join(work, "fp32.onnx")
        export_onnx(exported, images[:2], fp32, args.dynamic_size)
        diff, scale, agree = parity(fp32, model, images)
        allowed = args.tolerance * max(1.0, scale)
        print(f"parity on {len(images)} {source}: max |logit difference| {diff:.3g} (largest |logit| "
              f"{scale:.3g}, allowed {allowed:.3g}), top-1 agreement {agree:.2%}")
        if diff > allowed:
            raise UserError(f"ONNX Runtime disagrees with PyTorch (max |logit difference| {diff:.3g}, "
                            f"top-1 agreement {agree:.2%}): {args.output} not written")
        if args.quantize == "int8":
            meta.update(quantize(args, held, fp32, tmp))
        add_metadata(onnx, tmp, meta)
    print(f"{name} exported to {args.output} (opset {OPSET}, {meta['precision']}, {size} px, dynamic batch"
          f"{', height and width' if args.dynamic_size else ''})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
