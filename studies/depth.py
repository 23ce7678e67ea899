"""Depth + width against width alone at equal measured latency (scripts/depth_study.py).

Per dense checkpoint, runtime and speed-up target: the criterion's plan with `prune_depth` on and
off (`pruning.prune` with `--target_speedup X`: measured, re-planned until within 3%), each
evaluated right after pruning; `random` planned to the same predicted latency with the same
latency model (no timing: the shape is predicted as fast) over several seeds, as the floor; and
the criterion's pruned models fine-tuned with main.py over several seeds. Rows go to
results.jsonl (a rerun skips finished ones); `tables` turns them into the report's tables:
means with 95% t intervals, paired differences (depth - width, paired by dense model and
fine-tuning seed), measured speed-up against the MACs ratio.
"""
import os
import time
from dataclasses import replace

import torch

import models
from checkpoints.io import save_checkpoint_file
from pruning import KeepRules, PruneSpec, api
from pruning.blocks import score_blocks
from pruning.latency import WARN_MISS, LatencyModel, LatencySettings
from pruning.plan import plan_cut
from pruning.scoring import score_groups
from pruning.surgery import prune_checkpoint

from . import stats, study

MODES = ("width", "depth")
RETRIES = 2  # plans again (measuring again) when the measured speed-up misses by more than WARN_MISS


def rules_for(mode, speedup, backend, batch, **extra):
    return KeepRules(target_speedup=speedup, prune_depth=mode == "depth", latency_backend=backend,
                     latency_batch=batch, **extra)


def plan_at(src, spec, predicted_ms):
    """(checkpoint, seconds) of `spec` planned to a predicted latency with this machine's cached
    latency model, without timing the result (the random floor at an opnorm cell's latency)."""
    spec = replace(spec, rules=spec.rules.replace(target_speedup=None, target_latency=predicted_ms)).resolved()
    sd = src.sds[src.scored]
    with api.one_thread():
        scores = score_groups(sd, src.groups, spec.criterion, aggregation=spec.aggregation, seed=spec.seed or 0)
        block_scores = score_blocks(sd, src.blocks, spec.criterion, seed=spec.seed or 0) if spec.rules.prune_depth else None
    rules = spec.rules
    model = LatencyModel(src.arch, src.groups, spec.input_size,
                         LatencySettings(rules.latency_backend, rules.latency_batch, rules.latency_dtype)).load_or_fit()
    start = time.perf_counter()
    with api.one_thread():
        cut = plan_cut(src.groups, scores, rules, latency=(model, predicted_ms), blocks=src.blocks,
                       block_scores=block_scores, depths=src.depths)
    seconds = time.perf_counter() - start
    return prune_checkpoint(src.ckpt, src.sds, src.groups, cut.keep, src.arch, {}, cut.removed), seconds


def describe(ckpt, dense_arch, size):
    """Shape fields of a row: params, MACs ratio at `size`, blocks per stage, blocks removed."""
    arch = ckpt["arch"]
    params, macs = models.count_arch(arch, size)
    return {"params": params, "macs": macs, "macs_ratio": models.count_arch(dense_arch, size)[1] / macs,
            "depths": arch.get("depths"), "dims": arch.get("dims"),
            "removed": len(ckpt.get("pruning", {}).get("removed_blocks", []))}


class DepthStudy:
    """The cells of one study folder.

    Args:
        folder: the study folder (results.jsonl, study.json, ckpt/, ft/).
        settings: what defines the rows (checkpoints, targets, seeds, epochs ...), as JSON.
    """

    def __init__(self, folder, settings):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.settings = folder, settings
        self.results = study.Results(folder, settings, ("step",), ("step", "acc"))

    def _done(self, step):
        return self.results.has(step=step)

    def _add(self, step, **row):
        row = {"step": step, **row}
        self.results.add(row)
        print(f"{step}: top-1 {row['acc']:.2f}" + "".join(
            f", {k} {row[k]:.3g}" for k in ("speedup", "macs_ratio") if row.get(k) is not None), flush=True)

    def run_dense(self, d, path, criterion, targets, batch, size, random_seeds, ft_seeds, ft_epochs, train_args,
                  round_to=1):
        src = api.open_source(path)
        data = src.held.data_args()
        evaluator = study.Evaluator(data)
        self._add_once(f"d{d}/dense", lambda: {"acc": evaluator.accuracy(src.arch, src.sds["model"])})
        for backend, speedups in targets:
            for x in speedups:
                for mode in MODES:
                    cell = f"d{d}/{backend}/{x:g}x/{mode}"
                    self._prune(src, evaluator, cell, criterion, mode, x, backend, batch, size, round_to)
                    row = next(r for r in self.results.rows if r["step"] == f"{cell}/{criterion}")
                    for s in random_seeds:
                        self._random(src, evaluator, f"{cell}/random{s}", mode, s, row, backend, batch, size, round_to)
                    if backend == targets[0][0]:
                        for s in ft_seeds:
                            self._finetune(f"{cell}/{criterion}/ft{s}", f"{cell}/{criterion}", data, s, ft_epochs,
                                           train_args)

    def _add_once(self, step, make):
        if not self._done(step):
            self._add(step, **make())

    def _checkpoint(self, step):
        return os.path.join(self.folder, "ckpt", step.replace("/", "_") + ".pth")

    def _prune(self, src, evaluator, cell, criterion, mode, x, backend, batch, size, round_to):
        step = f"{cell}/{criterion}"
        if self._done(step):
            return
        spec = PruneSpec(criterion=criterion, rules=rules_for(mode, x, backend, batch, round_to=round_to), input_size=size)
        start = time.perf_counter()
        for _ in range(RETRIES + 1):  # a machine busy during the timing misses; the rows keep the target's
            result = api.prune(src, spec)
            if abs(result.latency["speedup"] / x - 1) <= WARN_MISS:
                break
            print(f"{step}: measured {result.latency['speedup']:.2f}x for {x:g}x; planning again", flush=True)
        seconds = time.perf_counter() - start
        _, plan_seconds = plan_at(src, spec, result.latency["predicted_ms"])
        path = self._checkpoint(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint_file(result.checkpoint, path)
        lat = result.latency
        self._add(step, acc=evaluator.accuracy(result.arch, result.checkpoint["model"]), speedup=lat["speedup"],
                  measured_ms=lat["measured_ms"], source_ms=lat["source_ms"], predicted_ms=lat["predicted_ms"],
                  attempts=lat["attempts"], seconds=seconds, plan_seconds=plan_seconds,
                  **describe(result.checkpoint, src.arch, size))

    def _random(self, src, evaluator, step, mode, seed, reference, backend, batch, size, round_to):
        if self._done(step):
            return
        spec = PruneSpec(criterion="random", seed=seed, rules=rules_for(mode, 2.0, backend, batch, round_to=round_to),
                         input_size=size)
        ckpt, _ = plan_at(src, spec, reference["predicted_ms"])
        self._add(step, acc=evaluator.accuracy(ckpt["arch"], ckpt["model"]), **describe(ckpt, src.arch, size))

    def _finetune(self, step, pruned_step, data, seed, epochs, train_args):
        if self._done(step):
            return
        out = os.path.join(self.folder, "ft", step.replace("/", "_"))
        _, acc = study.finetune(self._checkpoint(pruned_step), out, epochs, data, train_args, f"fine-tuning {step}",
                                extra=["--seed", str(seed)])
        self._add(step, acc=acc)


def _acc(rows, step):
    return next((r["acc"] for r in rows if r["step"] == step), None)


def tables(rows, dense_count, criterion, targets, random_seeds, ft_seeds):
    """The report's three tables (markdown lines): per runtime and target, each mode's speed,
    top-1 after pruning and fine-tuning with intervals and the random floor; depth - width
    paired; what planning cost."""
    out = ["| runtime | target | planner | measured speed-up (x) | MACs ratio (x) | speed-up / MACs ratio | blocks removed "
           "| top-1 after pruning | random floor (same latency) | fine-tuned |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    diffs = ["| runtime | target | depth - width after pruning | depth - width fine-tuned | "
             "depth - width, random floor |", "|---|---|---|---|---|"]
    cost = ["| runtime | target | planner | whole prune, timings included (s) | plans measured | planner alone (s) |",
            "|---|---|---|---|---|---|"]
    for backend, speedups in targets:
        for x in speedups:
            per_mode = {}
            # the dense models whose two plans are done (a study cut short reports those)
            done = [d for d in range(dense_count) if all(_acc(rows, f"d{d}/{backend}/{x:g}x/{m}/{criterion}") is not None
                                                         for m in MODES)]
            for mode in MODES if done else ():
                cells = {d: f"d{d}/{backend}/{x:g}x/{mode}" for d in done}
                main = [next(r for r in rows if r["step"] == f"{c}/{criterion}") for c in cells.values()]
                pruned = {d: m["acc"] for d, m in zip(done, main)}
                floor = {(d, s): _acc(rows, f"{c}/random{s}") for d, c in cells.items() for s in random_seeds}
                tuned = {(d, s): _acc(rows, f"{c}/{criterion}/ft{s}") for d, c in cells.items() for s in ft_seeds}
                floor = {k: v for k, v in floor.items() if v is not None}
                tuned = {k: v for k, v in tuned.items() if v is not None}
                per_mode[mode] = (pruned, floor, tuned)
                speed = stats.mean_interval([m["speedup"] for m in main])
                ratio = stats.mean_interval([m["macs_ratio"] for m in main])
                eff = stats.mean_interval([m["speedup"] / m["macs_ratio"] for m in main])
                removed = "/".join(str(m["removed"]) for m in main)
                cost.append(f"| {backend} | {x:g}x | {mode} | {stats.mean_interval([m['seconds'] for m in main]).text(1)} | "
                            f"{'/'.join(str(m['attempts']) for m in main)} | "
                            f"{stats.mean_interval([m['plan_seconds'] for m in main]).text(3)} |")
                out.append(f"| {backend} | {x:g}x | {criterion}, {mode} | {speed.text()} | {ratio.text()} | "
                           f"{eff.text()} | {removed} | {stats.mean_interval(list(pruned.values())).text()} | "
                           f"{_maybe(floor)} | {_maybe(tuned)} |")
            if len(per_mode) == 2:
                (pw, fw, tw), (pd, fd, td) = per_mode["width"], per_mode["depth"]
                diffs.append(f"| {backend} | {x:g}x | {_diff(pd, pw)} | {_diff(td, tw)} | {_diff(fd, fw)} |")
    return out, diffs, cost


def _maybe(values):
    return stats.mean_interval(list(values.values())).text() if values else "-"


def _diff(a, b):
    d = stats.paired_difference(a, b)
    if d is None:
        return "-"
    return d.text() + (" *" if d.excludes_zero else "") + ("" if d.half is None else f" (n = {d.n})")


def exactness(source, criterion="l2", removed_counts=(1,), seed=0, images=4):
    """Rows of the depth exactness check: for each N, the source pruned by --remove_blocks N
    against the source with those blocks' branches zeroed (surgery.silence_blocks), on seeded
    random images at the source's input size: (N, removed names, max |difference| / max |logit|)."""
    from pruning.surgery import silence_blocks
    size = source.held.input_size()
    x = torch.randn(images, source.arch.get("in_chans", 3), size, size, generator=torch.Generator().manual_seed(seed))
    rows = []
    for n in removed_counts:
        result = api.prune(source, PruneSpec(criterion=criterion, rules=KeepRules(remove_blocks=n), input_size=size))
        names = [b["name"] for b in result.removed_blocks]
        dead = models.with_weights(source.arch, silence_blocks(source.sds["model"], source.blocks, names))
        with torch.no_grad():
            ref, out = dead(x), result.model(x)
        rows.append((n, names, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))))
    return rows
