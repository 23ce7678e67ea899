"""Prune a checkpoint of any family into a smaller dense one (operator norm or a baseline).

    python pruning/prune.py --checkpoint IN.pth --output OUT.pth --criterion opnorm \\
        --dims 96 192 384 192
    python pruning/prune.py --checkpoint resnet56.pth --output r56_pruned.pth --criterion l1 \\
        --group_ratio 'layer1.*=0.1' 'layer2.*=0.2' 'layer3.*=0.3' layer1.7=0 layer2.0=0 layer3.0=0 layer3.8=0
    python pruning/prune.py --checkpoint vgg19.pth --output vgg19_slim.pth --criterion slimming \\
        --ratio 0.7 --normalize none
    python pruning/prune.py --checkpoint IN.pth --list_groups

Keep rules compose: --dims fixes the residual width of every stage, and each block's MLP
keeps its source ratio to it (4x stays 4x) unless --hidden_ratio (a share of the source width;
1 keeps every MLP whole) or --mlp_ratio (a multiple of the new residual width) says otherwise;
--group_ratio PATTERN=R prunes share R of every group whose name matches the glob (later
patterns win, R = 0 leaves a group whole); --target_params / --target_macs / --ratio /
--target_latency / --target_speedup then rank all groups not fixed by those in one global
ranking and drop the lowest-scored channels until every target is met. The latency targets
are measured on this machine in --latency_backend at --latency_batch (a latency model fitted
to real timings, cached per machine, plans the cut; the result is then timed for real, and
re-planned until it is within 3% of the target; a miss of more than 5% is reported):

    python pruning/prune.py --checkpoint IN.pth --output fast.pth --target_speedup 3 \
        --latency_backend onnxruntime --latency_batch 16 --input_size 224

With --normalize none that ranking compares raw scores across layers: `--criterion slimming
--ratio 0.7 --normalize none` is network slimming's global threshold. Every group keeps at
least one channel (and one per multi-scale branch). Equal scores keep the lower channel
index; kept indices stay in their original order. The output loads with
`python main.py --eval true --resume OUT.pth` (no --model needed).

--compensate refit fits the pruned model to the dense one on --calib_batches training images:
each LayerNorm's affine to the dense normalised outputs, each Linear that reads a LayerNorm
(MLP input, head) by least squares to the dense outputs, BatchNorm statistics re-measured
(--compensate stats: the norms only). It changes weights, not the shape.

Efficient ConvNeXt-T shapes: 21M --dims 96 192 384 576, 16M --dims 96 192 384 384,
13M --dims 96 192 384 192, 3M --dims 32 64 128 256 (from a 4x-MLP source such as ConvNeXt-T).
A URL (http/https) is downloaded once to the torch hub cache. MACs are counted at the
checkpoint's training input size unless --input_size says otherwise.

(pruning/cli.py: flags -> pruning.PruneSpec -> pruning.prune -> the printed table and files.)
"""
import argparse
import logging
import os
import sys

from checkpoints.sources import check_source, is_remote, set_download_timeout
from cli.flags import DATA_SETS, add_download_flag, str2bool
from common.errors import ArgumentParser, UserError, run_cli
from common.files import check_output_file, hold_lock
from deploy.runtime import runtime_names

from pruning.criteria import BASE_AGGREGATION, CRITERIA, NORMALIZATIONS, REDUCTIONS, SCOPES, Aggregation
from pruning.rules import budgets
from pruning.spec import COMPENSATIONS, Calibration, KeepRules, PruneSpec, rule_names


def get_args_parser():
    p = ArgumentParser("prune", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="source checkpoint: a .pth or .safetensors file (ours, official, Efficient "
                        "ConvNeXt or timm's layout), an http(s) URL, or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--output", help="pruned checkpoint to write (optional with --dry_run); a name "
                                    "ending in .safetensors writes the weights only, without pickle")
    p.add_argument("--criterion", default="opnorm", help="one of: " + ", ".join(CRITERIA))
    p.add_argument("--model", default=None, help="the model the weights are for: one of ours, any timm name "
                   "or torchvision:NAME (those two are traced); default: the checkpoint's arch, else "
                   "inferred from the tensor shapes")
    p.add_argument("--trace", type=str2bool, default=False, metavar="BOOL",
                   help="read the channel groups off a recorded forward even for this toolkit's families "
                        "(any other model is always traced)")
    rules = p.add_argument_group("keep rules")
    rules.add_argument("--dims", type=int, nargs="+",
                       help="residual width per stage (one number for isotropic)")
    rules.add_argument("--hidden_ratio", type=float, nargs="+",
                       help="share of MLP hidden channels kept in each block: one value or one per stage")
    rules.add_argument("--mlp_ratio", type=float, nargs="+",
                       help="MLP hidden width of each block = this x the stage's new residual width "
                       "(4 gives the Efficient ConvNeXt shapes): one value or one per stage")
    rules.add_argument("--group_ratio", type=_pattern_share, nargs="+", metavar="PATTERN=R",
                       help="prune share R of each group whose name matches the glob PATTERN "
                       "(later patterns win; R = 0 keeps a group whole); see --list_groups")
    for budget in budgets():
        rules.add_argument(f"--{budget.name}", type=budget.parse, metavar=budget.metavar, help=budget.help)
    rules.add_argument("--target_latency", type=float, metavar="MS",
                       help="prune until one batch runs in <= MS milliseconds on this machine "
                       "(global ranking; measured, see --latency_backend)")
    rules.add_argument("--target_speedup", type=float, metavar="X",
                       help="prune until the model runs X times faster than the source on this machine")
    rules.add_argument("--latency_backend", default="eager", choices=runtime_names(),
                       help="the runtime latency is measured in")
    rules.add_argument("--latency_batch", type=int, default=1, help="images per timed batch")
    rules.add_argument("--latency_dtype", default="fp32", choices=("fp32", "bf16"),
                       help="bf16: autocast (eager, compile)")
    rules.add_argument("--depths", type=int, nargs="+", metavar="D",
                       help="depth pruning: blocks kept per stage (one number for isotropic); the criterion's "
                       "block scores choose which go")
    rules.add_argument("--remove_blocks", type=int, metavar="N",
                       help="depth pruning: remove the N blocks with the lowest block scores (every stage keeps one)")
    rules.add_argument("--drop_blocks", nargs="+", metavar="NAME",
                       help="depth pruning: remove these blocks by name (--list_groups lists them)")
    rules.add_argument("--prune_depth", type=str2bool, default=False, metavar="BOOL",
                       help="with --target_latency / --target_speedup: plan depth and width together (a block "
                       "goes where its score per millisecond saved is below narrowing's)")
    rules.add_argument("--round_to", type=int, default=1,
                       help="widths chosen by --hidden_ratio, --mlp_ratio or a target round up "
                       "to a multiple of this")
    scoring = p.add_argument_group("scoring")
    scoring.add_argument("--scope", default=None, choices=SCOPES,
                         help="what a weight criterion reads: the producers' rows, or every "
                         "weight and scale slice the group cuts (default: per criterion, "
                         f"{_defaults_text()})")
    scoring.add_argument("--reduce", default=None, choices=REDUCTIONS,
                         help="combine the scored rows (default: per criterion)")
    scoring.add_argument("--normalize", default=None, choices=NORMALIZATIONS,
                         help="scale each row of scores before they are combined and ranked "
                         "(none: raw scores, one global threshold across layers; default: per criterion)")
    scoring.add_argument("--raw_weights", action="store_true",
                         help="score stored pwconv2 rows without folding in the layer scale gamma")
    scoring.add_argument("--use_ema", action="store_true", help="score the model_ema weights")
    scoring.add_argument("--seed", type=int, default=None,
                         help="draws of a seeded criterion (random) or the calibration images of a "
                         "data-driven one (default 0); refused for the others")
    p.add_argument("--compensate", default="none", choices=COMPENSATIONS,
                   help="after the cut: " + "; ".join(f"{k}: {v}" for k, v in COMPENSATIONS.items())
                   + " (reads the calibration images)")
    calib = p.add_argument_group("calibration (data-driven criteria: taylor, activation; --compensate stats)")
    calib.add_argument("--calib_batches", type=int, default=None,
                       help=f"training batches the data-driven criteria measure (default {Calibration().batches})")
    calib.add_argument("--calib_batch_size", type=int, default=None,
                       help=f"images per calibration batch (default {Calibration().batch_size})")
    calib.add_argument("--data_set", default=None, choices=DATA_SETS,
                       help="calibration data (default: the checkpoint's training data set)")
    calib.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image side for MACs and calibration (default: the checkpoint's training "
                   "size, else 224)")
    p.add_argument("--export_scores", default=None,
                   help="write per-group scores and each scored source's row to this JSON file")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan; write no checkpoint (--export_scores is still written)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--list_groups", action="store_true",
                   help="print the checkpoint's channel groups (name, kind, width) and exit")
    add_download_flag(p)
    return p


def _defaults_text():
    named = "; ".join(f"{c.name}: {c.aggregation.scope}/{c.aggregation.normalize}/{c.aggregation.reduce}"
                      for c in CRITERIA.values() if c.aggregation != BASE_AGGREGATION)
    base = BASE_AGGREGATION
    return f"scope/normalize/reduce {named}; others: {base.scope}/{base.normalize}/{base.reduce}"


def _pattern_share(text):
    """PATTERN=R of --group_ratio, e.g. 'layer1.*=0.1'."""
    pattern, sep, share = text.rpartition("=")
    try:
        value = float(share)
    except ValueError:
        value = None
    if not sep or not pattern or value is None:
        raise argparse.ArgumentTypeError(f"expected PATTERN=R (e.g. 'layer1.*=0.1'), got {text!r}")
    return pattern, value


def spec_from_args(args):
    """The PruneSpec the flags describe (values range-checked here; options the criterion does
    not read are refused by PruneSpec.resolved)."""
    calib = None
    if any(getattr(args, f) is not None for f in ("calib_batches", "calib_batch_size", "data_set", "data_path")):
        base = Calibration()
        calib = Calibration(batches=base.batches if args.calib_batches is None else args.calib_batches,
                            batch_size=base.batch_size if args.calib_batch_size is None else args.calib_batch_size,
                            data_set=args.data_set, data_path=args.data_path)
    rules = KeepRules(**{name: getattr(args, name) for name in rule_names()})
    return PruneSpec(criterion=args.criterion, rules=rules,
                     aggregation=Aggregation(scope=args.scope, normalize=args.normalize, reduce=args.reduce),
                     raw_weights=args.raw_weights, seed=args.seed, calibration=calib, use_ema=args.use_ema,
                     model=args.model, input_size=args.input_size, compensate=args.compensate, trace=args.trace)


def check_args(args):
    """Refuse bad input before any heavy work; the checked PruneSpec (None with --list_groups)."""
    set_download_timeout(args.download_timeout)
    check_source(args.checkpoint, f"--checkpoint {args.checkpoint}")
    if args.list_groups:
        return None
    spec = spec_from_args(args)
    spec.resolved()
    if args.output is None and not args.dry_run:
        raise UserError("--output is required (or use --dry_run)")
    if (args.output and args.export_scores and not args.dry_run
            and os.path.abspath(args.output) == os.path.abspath(args.export_scores)):
        raise UserError("--output and --export_scores name the same file; give two names")
    for flag, path in (("--output", args.output), ("--export_scores", args.export_scores)):
        if path is None or (flag == "--output" and args.dry_run):
            continue
        if path and not is_remote(args.checkpoint) and (os.path.abspath(path) == os.path.abspath(args.checkpoint) or (
                os.path.exists(path) and os.path.samefile(path, args.checkpoint))):
            raise UserError(f"{flag} {path} is the input checkpoint; choose another file")
        check_output_file(path, flag, args.overwrite)
    return spec


def list_groups(source):
    """One line per channel group (the names --group_ratio matches), then what stays whole,
    then the removable blocks (depth pruning)."""
    import models
    print(f"channel groups of {models.describe_arch(source.arch)}:")
    for g in source.groups:
        print(f"  {g.name:<24} {g.kind:<9} stage {g.stage}  width {g.width:>5}  cuts {len(g.slices)} tensor slices")
    for name, why in source.kept_whole.items():
        print(f"  {name:<24} kept whole: {why}")
    if source.blocks:
        per_stage = ", ".join(f"{sum(b.stage == s for b in source.blocks)} of {n}" for s, n in enumerate(source.depths))
        print(f"removable blocks (--depths, --remove_blocks, --drop_blocks) per stage: {per_stage}:")
        print("  " + " ".join(b.name for b in source.blocks))


def print_kept_whole(result, most=5):
    """The traced channels that stay whole, with the reason (never cut silently)."""
    whole = {k: v for k, v in result.kept_whole.items() if v != "the model's output"}
    if whole:
        lines = [f"{k}: {v}" for k, v in list(whole.items())[:most]]
        more = f"; +{len(whole) - most} more (--list_groups shows the trace's)" if len(whole) > most else ""
        print(f"kept whole ({len(whole)} channel sets): " + "; ".join(lines) + more)


def print_latency(r):
    """Predicted against measured, and a warning when the measurement misses the target."""
    from pruning.latency import WARN_MISS
    where = f"{r['backend']}, batch {r['batch']}, {r['dtype']}, {r['threads']} threads"
    line = f"latency ({where}): predicted {r['predicted_ms']:.3g} ms, measured {r['measured_ms']:.3g} ms"
    if r["target_speedup"] is not None:
        line += (f"; source {r['source_ms']:.3g} ms: {r['speedup']:.2f}x faster (target {r['target_speedup']:g}x)")
        gap = r["speedup"] / r["target_speedup"] - 1
    else:
        line += f" (target {r['target_ms']:g} ms)"
        gap = r["target_ms"] / r["measured_ms"] - 1
    print(line + f"; {r['attempts']} plan(s), latency model {r['cache']}")
    if abs(gap) > WARN_MISS:
        print(f"warning: the measurement is {abs(gap):.1%} {'faster' if gap > 0 else 'slower'} than the "
              "target (more than 5%): the shapes reachable near it, or this machine's noise, do not allow closer")


def run(args):
    import models  # here, not above: --help and flag errors come before torch loads
    from pruning import api
    spec = check_args(args)
    if args.output and not args.dry_run:  # two prunes to one file at once: the second is refused
        folder, name = os.path.split(os.path.abspath(args.output))
        hold_lock(folder, "--output", f".{name}.lock", thing=args.output)
    if args.list_groups:
        source = api.open_source(args.checkpoint, model=args.model, use_ema=args.use_ema,
                                 input_size=args.input_size, trace=args.trace)
        return list_groups(source)
    result = api.prune(args.checkpoint, spec)
    if result.evidence is not None:
        ev = result.evidence
        print(f"calibration: {ev.images} {ev.data_set} training images in {ev.batches} batches (seed {result.spec.seed})")
    comp = result.checkpoint["pruning"].get("compensation")
    if comp is not None:
        print(f"compensation {comp['method']}: {comp['layernorms']} LayerNorms refit, {comp['batchnorms']} "
              f"BatchNorms re-measured on {comp['images']} {comp['data_set']} training images")
    print(f"{result.spec.criterion.name} pruning of {args.checkpoint} ({models.describe_arch(result.source.arch)})")
    print(result.table())
    if result.removed_blocks:
        print(f"removed {len(result.removed_blocks)} blocks (block score): "
              + ", ".join(f"{b['name']} ({b['score']:.4g})" for b in result.removed_blocks))
    print(f"result: {models.describe_arch(result.arch)}")
    print_kept_whole(result)
    if result.latency is not None:
        print_latency(result.latency)
    if args.export_scores:
        result.export_scores(args.export_scores)
        print(f"scores written to {args.export_scores}")
    if args.dry_run:
        print("dry run: no checkpoint written")
        return
    result.save(args.output, overwrite=args.overwrite)
    print(f"pruned checkpoint written to {args.output} "
          f"(evaluate: python main.py --eval true --resume {args.output} --data_set ...)")


def main(argv=None):
    """The command line: exit status 0, or 2 with one `error:` line."""
    progress = logging.getLogger("pruning.latency")
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stderr))
        progress.setLevel(logging.INFO)
    return run_cli(lambda argv: run(get_args_parser().parse_args(argv)), argv)



if __name__ == "__main__":
    sys.exit(main())
