#!/usr/bin/env python
"""Classify one image with a checkpoint: the top-5 classes and their probabilities.

    python scripts/inference.py --image digit.png --checkpoint output/checkpoint-best.pth
    python scripts/inference.py --image cat.jpg --checkpoint convnext_tiny_1k_224_ema.pth \\
        --model convnext_tiny --class_names imagenet_classes.txt
    python scripts/inference.py --image digit.png --checkpoint model.onnx   # from scripts/export.py

The model is `--model` when given (the weights must fit it), else the checkpoint's `arch`, else
the shape of its weights. Class names come from `--class_names` (one per line), from `--data_set` /
`--data_path`, else from the data set recorded in the checkpoint's args, else class indices.
"""
import json
import logging
import os
import sys


from checkpoints.sources import set_download_timeout
from cli.flags import DATA_SETS, add_download_flag
from common.errors import ArgumentParser, UserError, first_line, parse_first, run_cli


def get_args_parser():
    parser = ArgumentParser("ConvNeXt single-image inference", description=__doc__)
    parser.add_argument("--image", required=True, help="image file to classify")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pth) of a trained model")
    parser.add_argument("--model", default=None,
                        help="model name (default: the checkpoint's arch, else its weights' shape)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="image size; default: the checkpoint's training input_size, else 224")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--class_names", default=None, help="text file, one class name per line")
    names.add_argument("--data_set", default=None, choices=DATA_SETS,
                       help="take the class names from this data set (with --data_path)")
    parser.add_argument("--data_path", default=None, help="data set folder for --data_set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--fold", action="store_true",
                        help="run the inference form (norm affines folded into the next layer)")
    add_download_flag(parser)
    return parser


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402
import datasets  # noqa: E402
import models  # noqa: E402
from checkpoints.identity import Held, load_held_model  # noqa: E402
from deploy.runtime import onnx_graph_sha256  # noqa: E402


logger = logging.getLogger("inference")
TOP_K = 5


def read_class_names(args, held, num_classes):
    """Class names from the file, the data set, the checkpoint's data set, or indices."""
    if args.class_names:
        if not os.path.isfile(args.class_names):
            raise UserError(f"class names file not found: {args.class_names}")
        try:
            with open(args.class_names, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"--class_names {args.class_names} is not UTF-8 text (byte {e.start})") from None
    elif args.data_set:
        names = datasets.class_names(datasets.default_data_args(
            data_set=args.data_set, data_path=args.data_path, nb_classes=num_classes))
    else:
        names = _names_from_training(held, num_classes)
    if len(names) != num_classes:
        raise UserError(f"{len(names)} class names given but the model has {num_classes} classes")
    return names


def _names_from_training(held, num_classes):
    """The names of the data set the checkpoint was trained on, if it can still be read."""
    if held.trained.get("data_set"):
        try:
            return datasets.class_names(held.data_args())
        except UserError as e:
            logger.warning("class names unavailable (%s); printing class indices", e)
    return [f"class {i}" for i in range(num_classes)]


def load_image(path, transform):
    """The image at `path` as a (1, 3, H, W) batch."""
    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    return transform(datasets.read_image(path)).unsqueeze(0)


def pick_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available; running on the CPU")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}") from None


@torch.inference_mode()
def class_probabilities(model, batch):
    """Softmax over the classes for a batch of one image."""
    return model(batch).float().softmax(dim=-1)[0].cpu()


def _transform(args, held):
    return datasets.build_transform(False, held.data_args(input_size=args.input_size))


def torch_probabilities(args):
    """(class probabilities, what the checkpoint holds) with a PyTorch checkpoint."""
    model, held = load_held_model(args.checkpoint, args.model, "model|state_dict")
    name = held.label
    held.check_size(held.input_size(args.input_size), device=args.device)
    print(f"Build `{name}` model successfully.")
    device = pick_device(args.device)
    model.eval()
    if args.fold:
        model = models.fold(model)
    model = model.to(device)
    print(f"Load `{name}` model weights `{os.path.abspath(args.checkpoint)}` successfully.")
    batch = load_image(args.image, _transform(args, held)).to(device)
    return class_probabilities(model, batch), held


def check_onnx(args, proto, meta):
    """An export of scripts/export.py, unchanged since (its graph hash), at a size it takes."""
    if "graph_sha256" not in meta or "input_size" not in meta:
        raise UserError(f"{args.checkpoint} has no export metadata (input size, normalisation, graph "
                        "hash): export it with scripts/export.py")
    if onnx_graph_sha256(proto) != meta["graph_sha256"]:
        raise UserError(f"{args.checkpoint} is damaged: its graph does not match the hash recorded "
                        "when it was exported")
    if args.input_size not in (None, meta["input_size"]) and not meta.get("dynamic_size"):
        raise UserError(f"--input_size {args.input_size}: {args.checkpoint} was exported for "
                        f"{meta['input_size']} px (export with --dynamic_size for other sizes)")


def onnx_probabilities(args):
    """(class probabilities, the export's metadata) with an ONNX file from scripts/export.py."""
    if args.model or args.fold:
        raise UserError("--model and --fold do not apply to an .onnx file: the graph is fixed")
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"an .onnx file needs onnx and onnxruntime ({e})") from None
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    try:
        proto = onnx.load(args.checkpoint, load_external_data=False)
        meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
        session = onnxruntime.InferenceSession(args.checkpoint, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnx / onnxruntime raise their own types for damaged files
        raise UserError(f"cannot read ONNX file {args.checkpoint}: {first_line(e)}") from None
    check_onnx(args, proto, meta)
    held = Held(None, {}, meta.get("arch"), meta.get("model"), meta)  # the export records the data flags
    batch = load_image(args.image, _transform(args, held))
    logits = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    print(f"Load ONNX model `{os.path.abspath(args.checkpoint)}` ({meta.get('model', 'unnamed')}) successfully.")
    return torch.from_numpy(logits).float().softmax(dim=-1)[0], held


def run(args):
    set_download_timeout(args.download_timeout)
    if args.data_path and not args.data_set:
        raise UserError("--data_path needs --data_set (which layout to read class names from)")
    if not os.path.isfile(args.image):
        raise UserError(f"image not found: {args.image}")
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input_size must be >= 1, got {args.input_size}")
    if args.checkpoint.endswith(".onnx"):
        probs, held = onnx_probabilities(args)
    else:
        probs, held = torch_probabilities(args)
    names = read_class_names(args, held, probs.numel())
    top = probs.topk(min(TOP_K, probs.numel()))
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{names[i]:<75} ({p * 100:.2f}%)")


def main(argv=None):
    """The command line: exit status 0, or 2 with one `error:` line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_cli(lambda a: run(get_args_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
