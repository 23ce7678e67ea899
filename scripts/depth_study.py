"""Depth + width against width alone at equal measured latency (studies/depth.py): per dense
checkpoint, runtime and speed-up target, the criterion's plan with --prune_depth on and off,
top-1 right after pruning, a random floor at the same predicted latency, and fine-tuning.

    python scripts/depth_study.py --checkpoints d0.pth d1.pth d2.pth --output_dir depth \\
        --targets eager:2,3,5 onnxruntime:3 --report docs/results/depth.md

Fine-tuning runs for the first runtime's cells. Rerun the same command after a kill: finished
rows are kept.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ArgumentParser, UserError, parse_first, run_cli  # noqa: E402


def _target(text):
    backend, sep, values = text.partition(":")
    try:
        speedups = [float(v) for v in values.split(",")]
    except ValueError:
        speedups = []
    if not sep or not backend or not speedups or min(speedups) <= 1:
        raise ValueError(f"expected RUNTIME:X[,X...] with each X > 1 (e.g. eager:2,3,5), got {text!r}")
    return backend, speedups


def get_args_parser():
    p = ArgumentParser("depth_study", description=__doc__)
    p.add_argument("--checkpoints", nargs="+", required=True, help="dense checkpoints of one shape")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--criterion", default="opnorm")
    p.add_argument("--targets", nargs="+", default=["eager:2,3,5"], help="RUNTIME:X,X,... speed-up targets")
    p.add_argument("--latency_batch", type=int, default=16)
    p.add_argument("--input_size", type=int, default=224, help="the side latency is measured at")
    p.add_argument("--round_to", type=int, default=1, help="prune.py --round_to of every plan (widths a multiple of this)")
    p.add_argument("--random_seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--finetune_seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--finetune_epochs", type=int, default=2)
    p.add_argument("--train_args", default="--lr 1e-3 --batch_size 32 --warmup_epochs 0 --drop_path 0 --mixup 0 "
                   "--cutmix 0 --reprob 0 --aa none --smoothing 0 --num_workers 0 --device cpu --save_ckpt false")
    p.add_argument("--report", help="write the tables as a markdown report")
    p.add_argument("--tables_only", action="store_true",
                   help="print (and --report) the tables of the finished rows; run no cell (a study cut short)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report file")
    return p


def check_args(args):
    try:
        args.targets = [_target(t) for t in args.targets]
    except ValueError as e:
        raise UserError(f"--targets: {e}") from None
    from deploy.runtime import runtime_names
    for backend, _ in args.targets:
        if backend not in runtime_names():
            raise UserError(f"--targets: unknown runtime {backend!r}; choose one of {', '.join(runtime_names())}")
    if min(args.latency_batch, args.input_size, args.finetune_epochs, args.round_to) < 1:
        raise UserError("--latency_batch, --input_size, --finetune_epochs and --round_to must be >= 1")
    if min(args.random_seeds + args.finetune_seeds, default=0) < 0:
        raise UserError("--random_seeds and --finetune_seeds must be >= 0")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise UserError(f"--checkpoints: {path} is not a file")


if __name__ == "__main__":
    parse_first(get_args_parser)

from common.files import check_output_file  # noqa: E402
from common.provenance import write_report  # noqa: E402
from studies.depth import DepthStudy, tables  # noqa: E402


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    if args.report:
        check_output_file(args.report, "--report", args.overwrite)
    settings = {k: getattr(args, k) for k in ("checkpoints", "criterion", "targets", "latency_batch", "input_size",
                                              "random_seeds", "finetune_seeds", "finetune_epochs", "train_args")}
    if args.round_to != 1:  # studies run before the flag keep their settings
        settings["round_to"] = args.round_to
    settings["checkpoints"] = [os.path.abspath(p) for p in args.checkpoints]
    run = DepthStudy(args.output_dir, settings)
    for d, path in enumerate([] if args.tables_only else args.checkpoints):
        run.run_dense(d, path, args.criterion, args.targets, args.latency_batch, args.input_size, args.random_seeds,
                      args.finetune_seeds, args.finetune_epochs, args.train_args, args.round_to)
    body = "\n\n".join("\n".join(t) for t in tables(run.results.rows, len(args.checkpoints), args.criterion,
                                                      args.targets, args.random_seeds, args.finetune_seeds))
    print(body)
    if args.report:
        write_report(args.report, "scripts/depth_study.py", " ".join(["python", *sys.argv]), body, args.overwrite)


if __name__ == "__main__":
    sys.exit(run_cli(main))
