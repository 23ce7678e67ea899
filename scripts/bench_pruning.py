#!/usr/bin/env python
"""Speed of operator-norm pruning: the vectorised criterion against the plain loop form.

Times scoring + keep planning + surgery of a full ConvNeXt-T checkpoint (a fresh random
convnext_tiny_unpruned_cifar10, pruned to the 13M shape) with `opnorm` (one batched SVD and
one contraction per producer) and with `opnorm_loop` (per channel SVD, per filter dot
product), checks that both give the same scores to 1e-6 and prints both times and the
speed-up.

    python scripts/bench_pruning.py                  # full comparison (the loop takes minutes)
    python scripts/bench_pruning.py --loop_layers 8  # loop on 8 producer tensors, extrapolated
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


from common.errors import ArgumentParser, parse_first, run_cli  # noqa: E402


def get_args_parser():
    p = ArgumentParser("bench_pruning", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnext_tiny_unpruned_cifar10", help="registered model to prune")
    p.add_argument("--dims", type=int, nargs="+", default=[96, 192, 384, 192], help="target dims")
    p.add_argument("--loop_layers", type=int, default=None,
                   help="run the loop form on the first N producer tensors only and extrapolate "
                   "by filter x channel pairs (default: all, the full comparison)")
    p.add_argument("--repeat", type=int, default=5, help="vectorised runs; the median is reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1, as prune_convnext.py runs; the loop form is single-threaded)")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402
import models  # noqa: E402
from pruning import criteria  # noqa: E402
from pruning.plan import plan_keep  # noqa: E402
from pruning.scoring import score_groups  # noqa: E402
from pruning.spec import KeepRules  # noqa: E402
from pruning.surgery import prune_state_dict  # noqa: E402


LOOP = "opnorm_loop"


def prune(sd, groups, criterion, dims):
    """Score every group, plan the kept channels and cut the state dict; (seconds, scores)."""
    start = time.perf_counter()
    scores = score_groups(sd, groups, criterion)
    keep = plan_keep(groups, scores, KeepRules(dims=dims, mlp_ratio=[4]))
    prune_state_dict(sd, groups, keep)
    return time.perf_counter() - start, scores


def producer_tensors(sd, groups):
    """Every scored producer tensor (key -> weight [F, ...]) with the pairs the loop visits."""
    out = {}
    for g in groups:
        for producer in g.producers:
            for part in producer.parts:
                w = sd[part.key]
                out[part.key] = (w, w.shape[0] * w.shape[1])
    return out


def time_loop_subset(sd, groups, n):
    """Loop form on n producer tensors; (seconds extrapolated to all, max diff on the subset)."""
    tensors = producer_tensors(sd, groups)
    keys = list(tensors)[:n]
    start = time.perf_counter()
    loop = {k: criteria.opnorm_loop(tensors[k][0]) for k in keys}
    seconds = time.perf_counter() - start
    pairs_all = sum(p for _, p in tensors.values())
    pairs_sub = sum(tensors[k][1] for k in keys)
    diff = max(float((criteria.opnorm(tensors[k][0]) - loop[k]).abs().max()) for k in keys)
    return seconds * pairs_all / pairs_sub, diff, pairs_sub, pairs_all


def max_difference(a, b):
    return max(float((a[name].sources[k] - b[name].sources[k]).abs().max())
               for name in a if a[name] is not None for k in a[name].sources)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = models.create_model(args.model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    groups = models.channel_groups(model.arch)
    n_params = sum(v.numel() for v in sd.values())
    print(f"{args.model}: {n_params:,} params, {len(groups)} groups, "
          f"{sum(len(g.producers) for g in groups)} producers; torch threads {torch.get_num_threads()}")
    torch.linalg.svd(torch.randn(4, 3, 2, dtype=torch.float64))  # load LAPACK before timing
    times = []
    for _ in range(max(args.repeat, 1)):
        seconds, fast = prune(sd, groups, "opnorm", args.dims)
        times.append(seconds)
    vec = statistics.median(times)
    print(f"vectorised opnorm: {vec:.3f} s (median of {len(times)}: "
          + ", ".join(f"{t:.3f}" for t in times) + ")")
    if args.loop_layers:
        loop, diff, sub, total = time_loop_subset(sd, groups, args.loop_layers)
        print(f"loop opnorm: {loop:.1f} s extrapolated from {args.loop_layers} producer tensors "
              f"({sub:,} of {total:,} filter x channel pairs)")
    else:
        opnorm = criteria.get_criterion("opnorm")  # the loop form, scored exactly as opnorm is
        criteria.register_criterion(dataclasses.replace(opnorm, name=LOOP, score=criteria.opnorm_loop),
                                    replace_existing=True)
        loop, slow = prune(sd, groups, LOOP, args.dims)
        diff = max_difference(fast, slow)
        print(f"loop opnorm: {loop:.1f} s (every producer of every group)")
    print(f"speed-up: {loop / vec:.0f}x; max score difference {diff:.2e} "
          f"({'equal' if diff <= 1e-6 else 'NOT equal'} to 1e-6)")
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
