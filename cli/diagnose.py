#!/usr/bin/env python
"""What pruning did to the statistics every norm computes: a dense checkpoint against pruned
copies of it, on calibration images (pruning/diagnosis.py says what each column means).

    python pruning/diagnose.py --checkpoint dense.pth --pruned opnorm_13M.pth random_13M.pth \\
        --output_dir diag

Prints one table per pruned checkpoint (a row per LayerNorm / BatchNorm, in forward order) and
a per-stage comparison; with --output_dir also writes diagnosis.json and diagnosis.png (a row
of panels per stage). Exit status 2 with one line for bad input.
"""
import json
import os
import sys


from checkpoints.sources import check_source, set_download_timeout
from cli.flags import DATA_SETS, add_download_flag
from common.errors import ArgumentParser, UserError, parse_first, run_cli
from common.files import atomic_open, atomic_path, check_output_file

from pruning.spec import Calibration


def get_args_parser():
    p = ArgumentParser("diagnose", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="the dense source checkpoint")
    p.add_argument("--pruned", nargs="+", required=True, help="checkpoints pruned from it (prune.py outputs)")
    p.add_argument("--calib_batches", type=int, default=8, help="training batches to measure on")
    p.add_argument("--calib_batch_size", type=int, default=32)
    p.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="the images (default: the checkpoint's training data set)")
    p.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    p.add_argument("--input_size", type=int, default=None, help="image side (default: the training size)")
    p.add_argument("--seed", type=int, default=0, help="which training images")
    p.add_argument("--top", type=int, default=5, help="how many largest-RMS channels to look for")
    p.add_argument("--output_dir", default=None, help="write diagnosis.json and diagnosis.png here")
    p.add_argument("--overwrite", action="store_true", help="replace those files")
    add_download_flag(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

from checkpoints.io import load_checkpoint_file  # noqa: E402
from pruning import api, diagnosis  # noqa: E402


COLUMNS = ("energy", "peak", "top", "sel_shift", "sel_var", "shift", "var", "cos_in", "cos_out")


def check_args(args):
    set_download_timeout(args.download_timeout)
    for path in [args.checkpoint] + args.pruned:
        check_source(path, path)
    if len(set(args.pruned)) != len(args.pruned):
        raise UserError("--pruned lists a checkpoint twice")
    if len({os.path.basename(p) for p in args.pruned}) != len(args.pruned):
        raise UserError("--pruned: two checkpoints share a file name; their tables would be confused")
    if args.seed < 0 or args.top < 1 or (args.input_size is not None and args.input_size < 1):
        raise UserError("--seed must be >= 0, --top and --input_size >= 1")
    calib = Calibration(batches=args.calib_batches, batch_size=args.calib_batch_size,
                        data_set=args.data_set, data_path=args.data_path)
    if args.output_dir is not None:
        if not os.path.isdir(args.output_dir):
            raise UserError(f"--output_dir {args.output_dir}: not a folder")
        for name in ("diagnosis.json", "diagnosis.png"):
            check_output_file(os.path.join(args.output_dir, name), "--output_dir", args.overwrite)
    return calib


def run(args):
    """Measure, print, and write the files; {label: NormRows}."""
    calib = check_args(args)
    source = api.open_source(args.checkpoint)
    size = source.held.input_size(args.input_size)
    batches, name = source.calibration(calib, size, args.seed)
    pruned = {os.path.basename(p): load_checkpoint_file(p) for p in args.pruned}
    results = diagnosis.diagnose_checkpoints(source, pruned, batches, args.top)
    print(f"{sum(len(y) for _, y in batches)} {name} training images at {size} px, dense {args.checkpoint}")
    for label, rows in results.items():
        print(f"\n{label}\n{table(rows)}")
    print("\nper stage (its last norm, whose input is the stage's output)")
    print(stage_table(results))
    if args.output_dir is not None:
        with atomic_open(os.path.join(args.output_dir, "diagnosis.json")) as f:
            json.dump({k: diagnosis.as_dicts(v) for k, v in results.items()}, f, indent=1)
        plot(results, os.path.join(args.output_dir, "diagnosis.png"))
        print(f"\nwritten: {args.output_dir}/diagnosis.json, diagnosis.png")
    return results


def _cells(r):
    num = {"energy": r.energy, "peak": r.peak, "sel_shift": r.sel_shift, "sel_var": r.sel_var,
           "shift": r.shift, "var": r.var, "cos_in": r.cos_in, "cos_out": r.cos_out}
    out = {k: "-" if v is None else f"{v:.3f}" for k, v in num.items()}
    out["top"] = f"{r.top_kept}/{r.top}"
    return [out[c] for c in COLUMNS]


def _format(header, rows):
    w = [max(len(str(r[c])) for r in [header] + rows) for c in range(len(header))]
    return "\n".join("  ".join(str(v).rjust(w[i]) if i else str(v).ljust(w[i]) for i, v in enumerate(r))
                     for r in [header] + rows)


def table(rows):
    return _format(["norm", "stage", "kept"] + list(COLUMNS),
                   [[r.name, "-" if r.stage is None else r.stage, f"{r.kept}/{r.width}"] + _cells(r) for r in rows])


def stage_table(results):
    rows = []
    for label, norm_rows in results.items():
        for r in diagnosis.stage_outputs(norm_rows):
            rows.append([label, r.stage, r.name, f"{r.kept}/{r.width}"] + _cells(r))
    return _format(["pruned", "stage", "norm", "kept"] + list(COLUMNS), rows)


def plot(results, path):
    """A row of panels per stage: energy share, var(kept)/var(all) of the selection, output cosine."""
    from studies.study import pyplot
    plt = pyplot()
    stages = sorted({r.stage for rows in results.values() for r in rows if r.stage is not None})
    panels = (("energy", "energy share kept"), ("sel_var", "var(kept) / var(all)"), ("cos_out", "cosine at output"))
    fig, axes = plt.subplots(len(stages), 3, figsize=(11, 2.4 * len(stages)), squeeze=False)
    for i, stage in enumerate(stages):
        for j, (field, title) in enumerate(panels):
            ax = axes[i][j]
            for label, rows in results.items():
                ys = [getattr(r, field) for r in rows if r.stage == stage]
                ax.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], marker="o", label=label)
            ax.set_title(f"stage {stage}: {title}", fontsize=9)
            if field == "sel_var":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("norm of the stage, forward order")
    fig.tight_layout()
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:  # replaces a link, never writes through it
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_cli(lambda argv: run(get_args_parser().parse_args(argv)) and None, argv)


if __name__ == "__main__":
    sys.exit(main())
