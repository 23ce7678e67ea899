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
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
import hub  # noqa: E402
from checkpoint import add_download_flag, load_held_model, local_copy, onnx_graph_sha256, set_download_timeout  # noqa: E402
from engine import evaluate  # noqa: E402
from errors import ArgumentParser, UserError, first_line, run_cli  # noqa: E402
from files import atomic_path, check_output_file, sha256_file  # noqa: E402

OPSET = 18


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
    p.add_argument("--data_set", default=None, choices=datasets.DATA_SETS,
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
    add_download_flag(p)
    return p


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
                                 ("--parity_images", args.parity_images != 64)) if on]
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


def runtime():
    """onnx and onnxruntime, imported only here (one clear line when missing)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"export needs the onnx and onnxruntime packages ({e}); "
                        "pip install -r requirements.txt") from None
    return onnx, onnxruntime


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


def export(model, example, path, dynamic_size):
    """torch's exporter (torch.export based) to `path`."""
    batch = torch.export.Dim("batch", min=1)
    shape = {0: batch}
    if dynamic_size:
        shape.update({2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)})
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=(shape,), verbose=False)
        program.save(path)
    except Exception as e:  # the exporter's own errors come from many modules
        raise UserError(f"ONNX export failed ({type(e).__name__}: {first_line(e)})") from None


def add_metadata(onnx, path, meta):
    m = onnx.load(path)
    meta = {**meta, "graph_sha256": onnx_graph_sha256(m)}
    for key, value in meta.items():
        m.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(m, path)
    onnx.checker.check_model(path, full_check=True)


def parity(ort, path, model, images):
    """(max |logit difference|, largest |logit|, top-1 agreement): ONNX Runtime vs PyTorch."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([session.run(None, {"images": images[i:i + 16].numpy()})[0]
                               for i in range(0, len(images), 16)])
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


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    onnx, ort = runtime() if args.format == "onnx" else (None, None)
    model, name, held = load_model(args)
    # DIGITS only names the transform when no --data_set is given (the images are random)
    data_args = held.data_args(args.data_set or "DIGITS", args.data_path, args.input_size)
    data_args.eval_data_path = args.eval_data_path
    size = data_args.input_size
    held.check_size(size, batch_size=args.parity_images if args.format == "onnx" else 4)
    if args.format == "timm":
        return export_timm(args, model, name, held, data_args)
    images, source = parity_images(args, data_args, args.parity_images)
    exported = fold(model, images) if args.fold else model
    with atomic_path(args.output, suffix=".onnx") as tmp:
        export(exported, images[:2], tmp, args.dynamic_size)
        add_metadata(onnx, tmp, {"input_size": size, "crop_pct": data_args.crop_pct,
                                 "imagenet_default_mean_and_std": data_args.imagenet_default_mean_and_std,
                                 "arch": getattr(model, "arch", None), "model": name,
                                 "data_set": held.trained.get("data_set"), "folded": args.fold,
                                 "dynamic_size": args.dynamic_size})
        diff, scale, agree = parity(ort, tmp, model, images)
        allowed = args.tolerance * max(1.0, scale)
        print(f"parity on {len(images)} {source}: max |logit difference| {diff:.3g} (largest |logit| "
              f"{scale:.3g}, allowed {allowed:.3g}), top-1 agreement {agree:.2%}")
        if diff > allowed:
            raise UserError(f"ONNX Runtime disagrees with PyTorch (max |logit difference| {diff:.3g}, "
                            f"top-1 agreement {agree:.2%}): {args.output} not written")
    print(f"{name} exported to {args.output} (opset {OPSET}, {size} px, dynamic batch"
          f"{', height and width' if args.dynamic_size else ''})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
