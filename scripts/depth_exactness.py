"""Depth exactness on a checkpoint: removing blocks equals zeroing their branches.

    python scripts/depth_exactness.py --checkpoint dense.pth --remove_blocks 1 4 8

For each N, the checkpoint pruned by --remove_blocks N (the criterion's lowest block scores)
against the checkpoint itself with those blocks' gain tensors zeroed (layer scale; the last
BatchNorm's affine), on seeded random images at its input size: the largest difference of the
logits over the largest logit. Prints one row per N; exits with status 1 when one exceeds
--tolerance.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ArgumentParser, UserError, parse_first, run_cli  # noqa: E402


def get_args_parser():
    p = ArgumentParser("depth_exactness", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of a family with removable blocks")
    p.add_argument("--remove_blocks", type=int, nargs="+", default=[1], help="block counts to remove, one row each")
    p.add_argument("--criterion", default="l2", help="the criterion whose block scores pick the blocks")
    p.add_argument("--images", type=int, default=4, help="random images compared")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference accepted")
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if min(args.remove_blocks) < 1 or args.images < 1 or args.tolerance <= 0:
        raise UserError("--remove_blocks and --images must be >= 1, --tolerance > 0")
    from pruning import api
    from studies.depth import exactness
    source = api.open_source(args.checkpoint)
    rows = exactness(source, args.criterion, args.remove_blocks, images=args.images)
    print("| blocks removed | which | max |pruned - zeroed| / max |logit| |\n|---:|---|---:|")
    for n, names, diff in rows:
        print(f"| {n} | {', '.join(names)} | {diff:.2e} |")
    worst = max(d for _, _, d in rows)
    if worst > args.tolerance:
        print(f"exactness FAILED: {worst:.2e} > {args.tolerance:g}")
        return 1
    print(f"exact: every difference <= {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
