#!/usr/bin/env python
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
patterns win, R = 0 leaves a group whole); --target_params / --target_macs / --ratio then rank
all groups not fixed by those in one global ranking and drop the lowest-scored channels until
every target is met. With --normalize none that ranking compares raw scores across layers:
`--criterion slimming --ratio 0.7 --normalize none` is network slimming's global threshold.
Every group keeps at least one channel (and one per multi-scale branch). Equal scores keep
the lower channel index; kept indices stay in their original order. The output loads with
`python main.py --eval true --resume OUT.pth` (no --model needed).

Efficient ConvNeXt-T shapes: 21M --dims 96 192 384 576, 16M --dims 96 192 384 384,
13M --dims 96 192 384 192, 3M --dims 32 64 128 256 (from a 4x-MLP source such as ConvNeXt-T).
A URL (http/https) is downloaded once to the torch hub cache. MACs are counted at the
checkpoint's training input size unless --input_size says otherwise.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
from pruning.calibration import calibration_batches, measure  # noqa: E402
from pruning.costs import CostModel  # noqa: E402
from pruning.plan import Targets, plan_keep  # noqa: E402
from pruning.criteria import CRITERIA, get_criterion  # noqa: E402
from pruning.scoring import (BASE_AGGREGATION, DEFAULT_AGGREGATION, NORMALIZATIONS, REDUCTIONS, SCOPES,  # noqa: E402
                             default_aggregation, score_groups)  # noqa: E402
from pruning.surgery import prune_checkpoint, read_source, sha256_file  # noqa: E402
from checkpoint import is_url, load_checkpoint_file, local_copy, saved_args, save_checkpoint_file  # noqa: E402
from errors import ArgumentParser, UserError, run_cli  # noqa: E402


def _count(text):
    """A count such as 13564330, 13.5M, 4.4e9 or 2G."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 13564330, 13.5M, 4.4G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def get_args_parser():
    p = ArgumentParser("prune", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="source checkpoint (ours, official or Efficient ConvNeXt)")
    p.add_argument("--output", help="pruned checkpoint to write (optional with --dry_run)")
    p.add_argument("--criterion", default="opnorm", help=f"one of: {', '.join(CRITERIA)}")
    p.add_argument("--model", default=None, help="registered model the weights must have the shape of "
                   "(default: the checkpoint's arch, else inferred from the tensor shapes)")
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
    rules.add_argument("--target_params", type=_count, help="prune until params <= N (global ranking)")
    rules.add_argument("--target_macs", type=_count, help="prune until MACs at --input_size <= N")
    rules.add_argument("--ratio", type=float, help="prune this share of the channels of the ranked groups")
    rules.add_argument("--round_to", type=int, default=1,
                       help="widths chosen by --hidden_ratio, --mlp_ratio or a target round up "
                       "to a multiple of this")
    scoring = p.add_argument_group("scoring")
    scoring.add_argument("--scope", default=None, choices=SCOPES,
                         help="what a weight criterion reads: the producers' rows, or every "
                         "weight and scale slice the group cuts (default: per criterion, "
                         f"{_defaults_text()})")
    scoring.add_argument("--reduce", default=None,
                         help=f"combine the scored rows: {', '.join(REDUCTIONS)} (default: per criterion)")
    scoring.add_argument("--normalize", default=None, choices=list(NORMALIZATIONS),
                         help="scale each row of scores before they are combined and ranked "
                         "(none: raw scores, one global threshold across layers; default: per criterion)")
    scoring.add_argument("--raw_weights", action="store_true",
                         help="score stored pwconv2 rows without folding in the layer scale gamma")
    scoring.add_argument("--use_ema", action="store_true", help="score the model_ema weights")
    scoring.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    calib = p.add_argument_group("calibration (criteria taylor and activation)")
    calib.add_argument("--calib_batches", type=int, default=None,
                       help="training batches the data-driven criteria measure (default 8 for them)")
    calib.add_argument("--calib_batch_size", type=int, default=32, help="images per calibration batch")
    calib.add_argument("--data_set", default=None, choices=datasets.DATA_SETS,
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
    return p


def _defaults_text():
    named = "; ".join(f"{c}: {'/'.join(v)}" for c, v in DEFAULT_AGGREGATION.items())
    return f"scope/normalize/reduce {named}; others: {'/'.join(BASE_AGGREGATION)}"


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


def check_args(args):
    """Refuse bad input before any heavy work."""
    get_criterion(args.criterion)
    defaults = default_aggregation(args.criterion)
    for flag, value in zip(("scope", "normalize", "reduce"), defaults):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.reduce not in REDUCTIONS:
        raise UserError(f"unknown --reduce {args.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if not is_url(args.checkpoint) and not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if args.list_groups:
        return
    if args.output is None and not args.dry_run:
        raise UserError("--output is required (or use --dry_run)")
    if not (args.dims or args.hidden_ratio or args.mlp_ratio or args.group_ratio
            or args.target_params or args.target_macs or args.ratio):
        raise UserError("no keep rule: give --dims, --hidden_ratio, --mlp_ratio, --group_ratio, "
                        "--target_params, --target_macs or --ratio (without one the output "
                        "equals the input)")
    if (args.output and args.export_scores and not args.dry_run
            and os.path.abspath(args.output) == os.path.abspath(args.export_scores)):
        raise UserError("--output and --export_scores name the same file; give two names")
    for flag, path in (("--output", args.output), ("--export_scores", args.export_scores)):
        if path is None or (flag == "--output" and args.dry_run):
            continue
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder; give a file name")
        if os.path.abspath(path) == os.path.abspath(args.checkpoint) or (
                os.path.exists(path) and os.path.samefile(path, args.checkpoint)):
            raise UserError(f"{flag} {path} is the input checkpoint; choose another file")
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"{flag} {path} exists; pass --overwrite to replace it")
        if flag == "--export_scores" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{flag} {path}: its folder does not exist")
    if args.round_to < 1:
        raise UserError(f"--round_to must be >= 1, got {args.round_to}")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise UserError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input_size must be >= 1, got {args.input_size}")
    check_calibration(args)


def check_calibration(args):
    """Calibration flags only with a data-driven criterion, which gets 8 batches by default."""
    data_driven = getattr(get_criterion(args.criterion), "evidence", None) is not None
    given = [f for f in ("calib_batches", "data_set", "data_path") if getattr(args, f) is not None]
    if given and not data_driven:
        raise UserError(f"--{given[0]} is read only by the data-driven criteria "
                        f"(taylor, activation), not by {args.criterion}")
    if data_driven and args.calib_batches is None:
        args.calib_batches = 8
    for flag in ("calib_batches", "calib_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")


def options(args):
    """The settings recorded in the checkpoint's `pruning` entry."""
    keys = ("criterion", "model", "dims", "hidden_ratio", "mlp_ratio", "target_params", "target_macs",
            "ratio", "group_ratio", "round_to", "scope", "reduce", "normalize", "raw_weights", "use_ema",
            "seed", "input_size", "calib_batches", "calib_batch_size", "data_set")
    out = {k: getattr(args, k) for k in keys}
    out["group_ratio"] = [list(pair) for pair in args.group_ratio] if args.group_ratio else None
    return out


def table(before, after, input_size):
    """The before/after lines: params, MACs, and the family's width rows."""
    rows = [("", "source", "pruned", "")]
    for label, i in (("params", 0), (f"MACs @{input_size}px", 1)):
        share = f"{after[i] / before[i]:.1%}" if before[i] else ""
        rows.append((label, f"{before[i]:,}", f"{after[i]:,}", share))
    for (label, a), (_, b) in zip(before[2], after[2]):
        rows.append((label, a, b, ""))
    w = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}".rstrip() for r in rows)


def summary(arch, input_size):
    params, macs = models.count_arch(arch, input_size)
    return params, macs, models.FAMILIES[arch["family"]].widths(arch)


def export(path, groups, scores, keep, provenance):
    """Per-group scores, each source's row (null where it does not cover), kept indices: JSON."""
    data = {"provenance": provenance, "groups": {}}
    for g in groups:
        s = scores[g.name]
        data["groups"][g.name] = {
            "kind": g.kind, "width": g.width, "kept": [int(i) for i in keep[g.name]],
            "score": None if s is None else s.score.tolist(),
            "sources": {} if s is None else {k: [None if math.isnan(x) else x for x in v.tolist()]
                                             for k, v in s.sources.items()}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def list_groups(arch, groups):
    """One line per channel group: the names --group_ratio matches."""
    print(f"channel groups of {models.describe_arch(arch)}:")
    for g in groups:
        print(f"  {g.name:<24} {g.kind:<9} width {g.width:>5}  cuts {len(g.slices)} tensor slices")


@dataclass
class Source:
    """A loaded source checkpoint: what scoring, calibration and surgery read."""
    path: str
    ckpt: dict
    sds: dict
    scored: str
    arch: dict
    groups: list
    sha256: str


def load_source(args):
    """Read --checkpoint (downloading a URL once) and settle --input_size from it."""
    local = local_copy(args.checkpoint)
    ckpt = load_checkpoint_file(local)
    if args.input_size is None:
        trained = saved_args(ckpt).get("input_size")
        args.input_size = trained if isinstance(trained, int) and trained > 0 else 224
    sds, scored, arch = read_source(ckpt, args.model, args.use_ema)
    return Source(args.checkpoint, ckpt, sds, scored, arch, models.channel_groups(arch), sha256_file(local))


def calibrate(args, source):
    """Evidence for a data-driven criterion (None for the others), seeded by --seed."""
    kind = getattr(get_criterion(args.criterion), "evidence", None)
    if kind is None:
        return None
    data = datasets.trained_data_args(saved_args(source.ckpt), args.data_set, args.data_path, args.input_size)
    batches, n = calibration_batches(data, args.calib_batches,
                                     args.calib_batch_size, args.seed)
    print(f"calibration: {n} training images in {len(batches)} batches (seed {args.seed})")
    return measure(source.arch, source.sds[source.scored], batches, (kind,))


def prune_source(args, source, evidence=None):
    """The pruned checkpoint (a dict) for the keep rules and scoring settings in `args`."""
    scores = score_groups(source.sds[source.scored], source.groups, args.criterion, args.reduce,
                          args.raw_weights, args.seed, args.normalize, args.scope, evidence)
    targets = Targets(args.target_params, args.target_macs, args.ratio)
    needs_cost = args.target_params is not None or args.target_macs is not None
    cost_model = CostModel(source.arch, source.groups, args.input_size) if needs_cost else None
    keep = plan_keep(source.groups, scores, args.dims, args.hidden_ratio, args.round_to, targets,
                     cost_model, args.mlp_ratio, args.group_ratio)
    provenance = {"criterion": args.criterion, "options": options(args),
                  "source": os.path.basename(source.path), "source_sha256": source.sha256,
                  "scored_weights": source.scored, "torch": str(torch.__version__)}
    pruned = prune_checkpoint(source.ckpt, source.sds, source.groups, keep, source.arch, provenance)
    return pruned, scores, keep


def run(args):
    check_args(args)
    source = load_source(args)
    if args.list_groups:
        return list_groups(source.arch, source.groups)
    before = summary(source.arch, args.input_size)  # also refuses an input size the model cannot take
    pruned, scores, keep = prune_source(args, source, calibrate(args, source))
    print(f"{args.criterion} pruning of {args.checkpoint} ({models.describe_arch(source.arch)})")
    print(table(before, summary(pruned["arch"], args.input_size), args.input_size))
    print(f"result: {models.describe_arch(pruned['arch'])}")
    if args.export_scores:
        export(args.export_scores, source.groups, scores, keep, pruned["pruning"])
        print(f"scores written to {args.export_scores}")
    if args.dry_run:
        print("dry run: no checkpoint written")
        return
    save_checkpoint_file(pruned, args.output)
    print(f"pruned checkpoint written to {args.output} "
          f"(evaluate: python main.py --eval true --resume {args.output} --data_set ...)")


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded, then restore: scoring is many small memory-bound ops, and on
    a busy 2-core machine OpenMP threads waiting for each other made it 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv=None):
    """The command line: exit status 0, or 2 with one `error:` line."""
    def work(argv):
        args = get_args_parser().parse_args(argv)
        with one_thread():
            run(args)
    return run_cli(work, argv)


if __name__ == "__main__":
    sys.exit(main())
