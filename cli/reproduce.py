#!/usr/bin/env python
"""Run a seed's whole pipeline with its published hyper-parameters, then print its README
table beside the seed's numbers.

    python scripts/reproduce.py --recipe pfec_resnet56 --data_set CIFAR10 --data_path /data/cifar \\
        --output_dir runs/pfec_r56
    python scripts/reproduce.py --recipe slimming_vgg19 --quick --output_dir /tmp/slim   # minutes, DIGITS

Every step lands in --output_dir (logs/<step>.log holds each tool's output); rerun the same
command after a kill: finished steps are skipped and a training resumes from its last epoch.
Top-1 is the last epoch's (the seeds report their best epoch, which selects on the test set).
"""
import os
import shlex
import sys


from studies import recipes
from common.errors import ArgumentParser, UserError, run_cli

DATA_SETS = ("CIFAR10", "CIFAR100", "TINY_IMAGENET", "image_folder", "DIGITS")


def get_args_parser():
    p = ArgumentParser("reproduce", description=__doc__)
    p.add_argument("--recipe", required=True, choices=list(recipes.RECIPES), help="the seed pipeline to run")
    p.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="the data (default: DIGITS with --quick; required otherwise)")
    p.add_argument("--data_path", default=None, help="its folder (INSTALL.md layouts)")
    p.add_argument("--output_dir", required=True, help="the pipeline folder (created; reused to resume)")
    p.add_argument("--gpus", type=int, default=1, help="processes per training step (torchrun when > 1)")
    p.add_argument("--pretrained", default=recipes.OFFICIAL_TINY_1K,
                   help="efficient_convnext_t: the ImageNet-1K ConvNeXt-T weights it fine-tunes "
                        "(a path, URL or hf-hub: id; default: the official EMA checkpoint)")
    p.add_argument("--quick", action="store_true",
                   help="1-epoch steps on DIGITS (CIFAR nets at 16 px, batch 16): checks the pipeline in minutes")
    p.add_argument("--dry_run", action="store_true", help="print every command and stop")
    return p


def check_args(args):
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    if args.quick:
        if args.data_set not in (None, "DIGITS") or args.data_path:
            raise UserError("--quick runs on the bundled DIGITS: leave out --data_set / --data_path")
        args.data_set = "DIGITS"
    elif args.data_set is None:
        raise UserError("--data_set is required (or --quick for DIGITS)")
    if args.data_set not in ("DIGITS",) and not args.data_path:
        raise UserError(f"--data_set {args.data_set} needs --data_path")
    if args.data_path and not args.dry_run and not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} is not a folder")
    if args.pretrained != recipes.OFFICIAL_TINY_1K and (args.recipe != "efficient_convnext_t" or args.quick):
        raise UserError("--pretrained applies to efficient_convnext_t without --quick (it starts from "
                        "ImageNet-1K weights; --quick trains from scratch)")
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file")
    if args.gpus > 1 and not args.dry_run:
        import torch
        if torch.cuda.device_count() < args.gpus:
            raise UserError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA devices")


def main(argv=None):
    def go(argv):
        args = get_args_parser().parse_args(argv)
        check_args(args)
        recipe = recipes.recipe(args.recipe, args.data_set, args.quick, args.pretrained)
        data_path = os.path.abspath(args.data_path) if args.data_path else None
        pipe = recipes.Pipeline(recipe, args.data_set, data_path, os.path.abspath(args.output_dir),
                                args.gpus, args.quick)
        pipe.check()
        if args.dry_run:
            for step in recipe.steps:
                print(f"# {step.name} ({step.kind})")
                for cmd in pipe.commands(step):
                    print(shlex.join(cmd))
                if step.kind == "ensemble":
                    print(f"# top-1 of the mean softmax of {', '.join(step.members)} (in this process)")
            return 0
        if not args.quick and args.data_set not in recipe.data_sets:
            print(f"warning: the seed published {', '.join(recipe.data_sets)}, not {args.data_set}: its "
                  "columns show the first of those", file=sys.stderr)
        settings = {"recipe": args.recipe, "data_set": args.data_set, "data_path": data_path,
                    "gpus": args.gpus, "quick": args.quick,
                    "pretrained": args.pretrained if args.recipe == "efficient_convnext_t" else None}
        rows = recipes.run(pipe, settings)
        print("\n" + recipes.table(pipe, rows))
        if args.quick:
            print("\n--quick: 1-epoch steps on DIGITS check that the pipeline runs; one epoch's accuracy "
                  "says little about the recipe.")
        return 0

    return run_cli(go, argv, stopped=lambda: "finished steps are kept; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
