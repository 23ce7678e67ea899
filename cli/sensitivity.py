#!/usr/bin/env python
"""Sensitivity analysis (Li et al., Figure 2): prune one group, or one named set of groups, at a
time at ratios 0.1 .. 0.9, no fine-tuning, and measure the accuracy after each cut.

    python pruning/sensitivity.py --checkpoint resnet56.pth --output_dir sens --criterion l1 \\
        --tolerance 1
    python pruning/sensitivity.py --checkpoint dense.pth --output_dir sens_stages \\
        --sets 'stages.0.*' 'stages.1.*' 'stages.2.*' 'stages.3.*'

Each set is a glob over the channel-group names (prune.py --list_groups); by default every
group is its own set. A cut of share R keeps floor((1 - R) x width) channels of each matched
group, the best ones by the criterion (prune.py --group_ratio PATTERN=R). Writes
results.jsonl, sensitivity.csv and sensitivity.png (accuracy against ratio, one curve per set)
into --output_dir; rerun the same command after a kill to finish the rest. With --tolerance T
it prints the --group_ratio arguments that keep every set, pruned alone, within T points of the
source (the largest ratio whose accuracy and every smaller ratio's stay within T). Sets pruned
together usually lose more than each alone: fine-tune, and check the combined cut.

With --blocks true it measures depth instead: each removable block removed alone (prune.py
--drop_blocks NAME), one row per block (ratio 1), a table and sensitivity.png (accuracy per
block); --tolerance T then prints the --drop_blocks names each within T points alone.
"""
import fnmatch
import os
import sys
import time
from types import SimpleNamespace


from cli.flags import DATA_SETS, str2bool
from common.errors import UserError, parse_first, run_cli
from studies import dispatch


DEFAULT_RATIOS = [round(0.1 * i, 1) for i in range(1, 10)]


def get_args_parser():
    p = dispatch.study_parser("sensitivity", __doc__)
    p.add_argument("--criterion", default="l1", help="NAME or NAME:flag=value,... (see compare_criteria.py)")
    p.add_argument("--blocks", type=str2bool, default=False, metavar="BOOL",
                   help="remove each removable block alone instead of pruning groups at --ratios")
    p.add_argument("--sets", nargs="+", default=None,
                   help="glob patterns over group names, one set each (default: every group)")
    p.add_argument("--ratios", nargs="+", type=float, default=DEFAULT_RATIOS,
                   help="shares of each set's channels to prune")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (used by seeded criteria)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="print the --group_ratio arguments keeping each set within this many points")
    p.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="evaluation data (default: the checkpoint's)")
    p.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    p.add_argument("--eval_subset", type=int, default=None, help="evaluate on this many images (fixed)")
    dispatch.add_flags(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import models  # noqa: E402
from studies import study  # noqa: E402


def check_args(args):
    study.check_common(args)
    dispatch.check_flags(args)
    if not all(0 < r < 1 for r in args.ratios) or len(set(args.ratios)) != len(args.ratios):
        raise UserError("--ratios must be distinct values in (0, 1)")
    if args.tolerance is not None and args.tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.blocks and (args.sets or args.ratios != DEFAULT_RATIOS):
        raise UserError("--sets and --ratios prune channel groups; --blocks removes each removable block whole: "
                        "give one")
    if args.blocks:
        args.ratios = [1.0]


def check_sets(sets, groups):
    for pattern in sets:
        if not any(fnmatch.fnmatchcase(g.name, pattern) for g in groups):
            raise UserError(f"--sets {pattern} matches no group (prune.py --list_groups prints their names)")


def plan_cells(args, c_argv):
    if len(args.seeds) > 1 and not study.uses_seed(c_argv):
        raise UserError(f"--seeds: {c_argv[1]} gives the same scores for every seed; give one seed "
                        "or a seeded criterion (random, taylor, activation)")
    seeds = args.seeds
    cells = []
    for seed in seeds:  # outermost: each seed's calibration is measured once
        for pattern in args.sets:
            for ratio in sorted(args.ratios):
                rule = ["--drop_blocks", pattern] if args.blocks else ["--group_ratio", f"{pattern}={ratio}"]
                spec = study.cell_spec(args.checkpoint, c_argv + rule + ["--input_size", str(args.input_size)]
                                       + study.seed_flags(c_argv, seed)
                                       + study.calibration_flags(c_argv, args.data_set, args.data_path))
                cells.append((pattern, ratio, seed, spec))
    return cells


def context(args):
    """What every cell reads: the source (opened once), the evaluation images, calibrations."""
    source, _ = study.open_source(args.checkpoint)
    return SimpleNamespace(source=source, evaluator=study.Evaluator(args.data, args.eval_subset), evidence={})


def compute(ctx, args, cell):
    pattern, ratio, seed, spec = cell
    pruned = study.prune_cell(ctx.source, spec, ctx.evidence)
    params, _ = models.count_arch(pruned["arch"], args.input_size)
    return {"set": pattern, "ratio": ratio, "seed": seed, "params": params,
            "acc": ctx.evaluator.accuracy(pruned["arch"], pruned["model"])}


def say(n, total, row):
    what = "removed" if row["ratio"] == 1 else f"pruned by {row['ratio']:g}"  # group ratios are < 1
    print(f"[{n}/{total}] {row['set']} {what} (seed {row['seed']}): top-1 {row['acc']:.2f} "
          f"({row['params'] / 1e6:.2f}M params)", flush=True)


def curves(args, results):
    """set -> [(ratio, mean top-1 over seeds)] in ratio order."""
    out = {}
    for pattern in args.sets:
        out[pattern] = [(r, study.mean_sd([x["acc"] for x in results.rows
                                           if x["set"] == pattern and x["ratio"] == r])[0])
                        for r in sorted(args.ratios)]
    return out


def tolerated(curve, base, tolerance):
    """The largest ratio whose accuracy, and every smaller ratio's, is within tolerance of base."""
    best = 0.0
    for ratio, acc in curve:
        if acc < base - tolerance:
            break
        best = ratio
    return best


def plot_blocks(curve_of, base, path, criterion):
    """Accuracy with each block removed alone, one bar per block in model order."""
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(curve_of)), 4.5))
    names = list(curve_of)
    ax.bar(range(len(names)), [c[0][1] for c in curve_of.values()])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_title(f"sensitivity to removing one block ({criterion} block scores recorded)")
    study.finish_plot(plt, fig, ax, base, "block removed", path)


def plot(curve_of, base, path, criterion, streams):
    """One curve per set; sets that cut a residual stream drawn thicker."""
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("turbo", max(len(curve_of), 2))
    for i, (pattern, curve) in enumerate(curve_of.items()):
        ax.plot([r for r, _ in curve], [a for _, a in curve], marker="o", markersize=3, label=pattern,
                color=colours(i), linewidth=2 if pattern in streams else 1)
    ax.set_title(f"sensitivity to pruning ({criterion})")
    study.finish_plot(plt, fig, ax, base, "share of the set's channels pruned", path,
                      fontsize=6, ncol=2 if len(curve_of) > 8 else 1)


def run(args):
    check_args(args)
    c_argv = study.criterion_argv(args.criterion)
    source, args.input_size = study.open_source(args.checkpoint)
    if args.blocks:
        if not source.blocks:
            raise UserError("--blocks: this model declares no removable blocks (residual blocks with an identity "
                            "shortcut)")
        args.sets = [b.name for b in source.blocks]
    args.sets = args.sets or [g.name for g in source.groups]
    if not args.blocks:
        check_sets(args.sets, source.groups)
    cells = plan_cells(args, c_argv)
    data = args.data = source.held.data_args(args.data_set, args.data_path, args.input_size)
    settings = {k: getattr(args, k) for k in ("criterion", "sets", "ratios", "seeds", "data_set",
                                              "data_path", "eval_subset")}
    if args.blocks:  # a block study is another study: its folder says so
        settings["blocks"] = True
    settings.update(source_sha256=source.sha256, input_size=args.input_size)
    evaluator = study.Evaluator(data, args.eval_subset)  # data errors first: they leave no folder
    results = study.Results(args.output_dir, settings, ("set", "ratio", "seed"),
                            ("set", "ratio", "seed", "params", "acc"))
    base = evaluator.accuracy(source.arch, source.sds[source.scored])
    print(f"{len(cells)} cells ({len(results.rows)} done before); source top-1 {base:.2f} on "
          f"{evaluator.images} {data.data_set} images", flush=True)
    start = time.time()
    local = SimpleNamespace(source=source, evaluator=evaluator, evidence={})
    dispatch.run_cells(args, results, [({"set": c[0], "ratio": c[1], "seed": c[2]}, c) for c in cells], context,
                       compute, say, name="sensitivity", ctx=local)
    curve_of = curves(args, results)
    header = ["set"] + [f"{r:g}" for r in sorted(args.ratios)]
    rows = [[p] + [round(a, 2) for _, a in c] for p, c in curve_of.items()]
    study.write_table(os.path.join(args.output_dir, "sensitivity.csv"), header, rows)
    streams = {p for p in args.sets
               if any(g.kind == "residual" and fnmatch.fnmatchcase(g.name, p) for g in source.groups)}
    if args.blocks:
        plot_blocks(curve_of, base, os.path.join(args.output_dir, "sensitivity.png"), args.criterion)
    else:
        plot(curve_of, base, os.path.join(args.output_dir, "sensitivity.png"), args.criterion, streams)
    print("\n| set | " + " | ".join(header[1:]) + " |\n|---|" + "---:|" * (len(header) - 1))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    if args.tolerance is not None and args.blocks:
        kept = [p for p, c in curve_of.items() if c[0][1] >= base - args.tolerance]
        print(f"\nwithin {args.tolerance:g} points of {base:.2f}, each block removed alone:")
        print("--drop_blocks " + " ".join(kept) if kept else "no block can be removed within the tolerance")
    elif args.tolerance is not None:
        picks = {p: tolerated(c, base, args.tolerance) for p, c in curve_of.items()}
        kept = [f"'{p}={r:g}'" for p, r in picks.items() if r > 0]
        print(f"\nwithin {args.tolerance:g} points of {base:.2f}, each set pruned alone:")
        print("--group_ratio " + " ".join(kept) if kept else "no set can be pruned within the tolerance")
    print(f"\n{time.time() - start:.0f} s; results.jsonl, sensitivity.csv and sensitivity.png in {args.output_dir}")


def main(argv=None):
    return run_cli(lambda argv: run(get_args_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
