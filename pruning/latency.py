"""The latency keep rule: a measured model of how fast a candidate shape runs on this machine.

`LatencyModel` predicts the time of one batch for any kept-channel set (and set of removed
blocks) of a source shape. Every layer of these families is a conv, a Linear or a norm; the time
is taken as a rate per MAC of the dense layers (convs, Linears), one per MAC of the depthwise
convs, one per activation element the layers write (memory traffic: norms, activations, adds
follow these sizes), one per layer (its fixed overhead, what a removed block saves beyond its
widths) and a constant. The rates are fitted (non-negative least squares) to real timings of
the source and of `VARIANTS` shapes of random widths (half of them without some blocks), run in the chosen runtime at
the chosen batch and precision, and cached per machine, runtime, versions, shape, input size
and batch (`cache_dir()`), so a second pruning of the same source times nothing.

`meet_target` then plans against the prediction, times the planned shape for real (against
the source, alternately, for a speed-up), and re-plans with the prediction's target corrected
by the measured miss until the measurement is within `TOLERANCE` (at most `ATTEMPTS` plans).

The channels go in the criterion's global worst-first order, as for --target_macs; latency
only says where to stop. Ranking by score per millisecond saved (the knapsack ratio) was
measured and dropped: the per-group normalised scores are not comparable across groups, so
it emptied the high-resolution stage (ConvNeXt-T at 3x on DIGITS: stage 1 kept 1 channel,
top-1 9.7%; with the square root of the cost 71.4%, score order 87.8%; docs/design.md 6b).
"""
import copy
import hashlib
import json
import math
import logging
import os
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import models
from common.errors import UserError
from common.files import atomic_open
from common.provenance import machine
from deploy.runtime import Settings, check_settings, get_runtime

from .costs import KeptShapes, owned_by_any
from .blocks import one_per_stage
from .plan import select
from .surgery import new_arch, prune_state_dict, remove_blocks

logger = logging.getLogger("pruning.latency")
FEATURES = ("dense_macs", "depthwise_macs", "elements", "layers", "constant")
VARIANTS = 12      # random-width shapes the rates are fitted to (besides the source); with
                   # removable blocks, every second one also lacks a random half of them
TOLERANCE = 0.03   # re-plan while the measurement misses the target by more than this share
ATTEMPTS = 4
WARN_MISS = 0.05   # the final measurement further than this from the target is reported
FORMAT = 2         # of the cache files (2: the per-layer feature, shapes without blocks)


@dataclass(frozen=True)
class LatencySettings:
    """Where latency is measured: a registered runtime's name, images per batch, fp32 or bf16."""
    backend: str = "eager"
    batch: int = 1
    dtype: str = "fp32"

    def runtime(self, input_size):
        amp = "bf16" if self.dtype == "bf16" else "none"
        return check_settings(Settings("cpu", input_size, self.batch, amp=amp, backend=self.backend))

    def describe(self):
        return f"{self.backend}, batch {self.batch}, {self.dtype}, {torch.get_num_threads()} threads"


def cache_dir():
    """$EFFICIENT_CONVNEXT_CACHE/latency, else ~/.cache/efficient_convnext/latency."""
    root = os.environ.get("EFFICIENT_CONVNEXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "efficient_convnext")
    return os.path.join(root, "latency")


def read_cache(path):
    """(rates, fit errors) of a cache file, checked as data: one finite, non-negative rate per
    feature and finite fit errors; a file of any other shape is refused with its path."""
    def refuse(why):
        raise UserError(f"latency cache {path} {why}; move it away to time this machine again")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        refuse(f"is unreadable ({e})")
    rates = data.get("rates") if isinstance(data, dict) else None
    errors = data.get("fit_errors") if isinstance(data, dict) else None
    if not isinstance(rates, list) or len(rates) != len(FEATURES) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0 for r in rates):
        refuse(f"does not hold {len(FEATURES)} finite, non-negative rates (one per feature: {', '.join(FEATURES)})")
    if not isinstance(errors, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in errors.values()):
        refuse("does not hold finite fit errors")
    return np.array(rates, dtype=np.float64), errors


def _layers(arch, input_size):
    """weight key -> (kind, output positions per channel) for every conv, Linear and norm."""
    model = models.meta_model(arch).eval()
    layers, hooks = {}, []

    def kind_of(module):
        if isinstance(module, nn.Conv2d):
            if module.groups > 1 and module.groups == module.in_channels:
                return "dw"
            return "pw" if module.kernel_size == (1, 1) else "conv"
        if isinstance(module, nn.Linear):
            return "pw"
        weight = getattr(module, "weight", None)
        return "norm" if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None

    def hook_for(key, kind, channels):
        def hook(module, inputs, output):
            layers[key] = (kind, output.numel() // channels)
        return hook

    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is not None and not list(module.children()):
            channels = module.weight.shape[0]
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight", kind, channels)))
    with torch.no_grad():
        model(torch.empty(1, arch.get("in_chans", 3), input_size, input_size, device="meta"))
    for h in hooks:
        h.remove()
    return layers, {k: tuple(v.shape) for k, v in model.state_dict().items()}


class LatencyModel:
    """Predicted milliseconds per batch of candidate kept-index sets of one source shape.

    Args:
        arch, groups: the source shape and its channel groups.
        input_size: image side in pixels.
        settings: LatencySettings.
    """

    def __init__(self, arch, groups, input_size, settings):
        self.arch, self.groups, self.input_size, self.settings = arch, groups, input_size, settings
        self.layers, shapes = _layers(arch, input_size)
        self.meta_state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        self.kept_shapes = KeptShapes({k: shapes[k] for k in self.layers}, groups)
        self.blocks = models.removable_blocks(arch)
        self.removed = ()  # blocks counted as gone (see `without`)
        self.rates = None
        self.fit_errors = None
        self.cache_path = None

    # --- the model ------------------------------------------------------------------------

    def without(self, removed):
        """This model (fitted rates shared) with the blocks named in `removed` counted as gone."""
        view = copy.copy(self)
        view.removed = tuple(removed)
        return view

    def features(self, keep):
        """The FEATURES of a candidate (absent groups keep every channel; removed blocks add nothing)."""
        out = dict.fromkeys(FEATURES, 0.0)
        for key, size in self.kept_shapes(keep).items():
            if owned_by_any(key, self.removed):
                continue
            kind, positions = self.layers[key]
            if kind != "norm":
                out["depthwise_macs" if kind == "dw" else "dense_macs"] += float(np.prod(size)) * positions
            out["elements"] += float(size[0]) * positions
            out["layers"] += 1.0
        out["constant"] = 1.0
        return np.array([out[f] for f in FEATURES])

    def predict(self, keep):
        """Predicted milliseconds of one batch."""
        return float(self.features(keep) @ self.rates)

    def arch_of(self, keep):
        """The shape a candidate gives (surgery on weightless tensors)."""
        state = prune_state_dict(self.meta_state, self.groups, keep)
        return new_arch(self.arch, remove_blocks(state, self.blocks, self.removed))

    # --- fitting and the cache ------------------------------------------------------------

    def key(self):
        s = self.settings
        return {"format": FORMAT, "arch": self.arch, "input_size": self.input_size, "backend": s.backend,
                "batch": s.batch, "dtype": s.dtype, "threads": torch.get_num_threads(), "machine": machine(),
                **get_runtime(s.backend).versions()}

    def load_or_fit(self):
        """Read the cached rates of this key, else time the shapes, fit and cache. Returns self."""
        key = self.key()
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.cache_path = os.path.join(cache_dir(), f"{digest}.json")
        if os.path.exists(self.cache_path):
            self.rates, self.fit_errors = read_cache(self.cache_path)
            return self
        samples = self._time_variants()
        self._fit(samples)
        self._check_separates(samples)
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        with atomic_open(self.cache_path) as f:
            json.dump({"key": key, "features": FEATURES, "rates": self.rates.tolist(),
                       "fit_errors": self.fit_errors, "samples": samples}, f, default=str)
        return self

    def _variants(self):
        """(keep, removed blocks) from small to whole: a share per shape, each group's jittered
        around it; every second shape also lacks about half the removable blocks (each stage
        keeps one), so the fit sees what a block costs beyond its widths."""
        gen = torch.Generator().manual_seed(0)
        shapes = [({}, ())]
        for i in range(VARIANTS):
            base = 0.1 + 0.9 * i / max(VARIANTS - 1, 1)
            keep = {}
            for g in self.groups:
                share = min(1.0, base * (0.5 + float(torch.rand((), generator=gen))))
                keep[g.name] = select(g, torch.arange(g.width), max(1, round(share * g.width)))
            removed = self._random_blocks(gen) if i % 2 else ()
            shapes.append((keep, removed))
        return shapes

    def _random_blocks(self, gen):
        if not self.blocks:
            return ()
        drawn = [b for b in self.blocks if float(torch.rand((), generator=gen)) < 0.5]
        depths = models.FAMILIES[self.arch["family"]].stage_depths(self.arch)
        return tuple(b.name for b in one_per_stage(drawn, depths))

    def _time_variants(self):
        samples = []
        shapes = self._variants()
        for i, (keep, removed) in enumerate(shapes):
            logger.info("latency model: timing shape %d of %d (%s)", i + 1, len(shapes), self.settings.describe())
            view = self.without(removed)
            ms = time_shapes([view.arch_of(keep)], self.input_size, self.settings, rounds=1)[0]
            samples.append({"features": view.features(keep).tolist(), "removed": list(removed), "ms": ms})
        return samples

    def _check_separates(self, samples):
        """Refuse a fit that cannot tell the shapes apart (a machine too busy to time, or a model
        whose time is all per-op overhead): it would plan nothing, or anything."""
        smallest = min(samples[1:], key=lambda s: s["features"][0])
        predicted = [float(np.array(s["features"]) @ self.rates) for s in (samples[0], smallest)]
        if not (samples[0]["ms"] > 1.2 * smallest["ms"] and predicted[0] > 1.2 * predicted[1]):
            raise UserError(f"latency: the timed shapes do not separate (source {samples[0]['ms']:.3g} ms, "
                            f"smallest shape {smallest['ms']:.3g} ms, predicted {predicted[0]:.3g} / "
                            f"{predicted[1]:.3g} ms): this machine is too busy to time, or the model's time "
                            "at this batch and size is per-op overhead; nothing was cached")

    def _fit(self, samples):
        from scipy.optimize import nnls
        x = np.array([s["features"] for s in samples])
        y = np.array([s["ms"] for s in samples])
        scale = x.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(x / scale, y)
        self.rates = coef / scale
        rel = np.abs(x @ self.rates - y) / y
        self.fit_errors = {"max": float(rel.max()), "mean": float(rel.mean())}


def time_shapes(archs, input_size, settings, rounds=3):
    """Median milliseconds of one batch of each shape (random weights), the shapes timed
    alternately `rounds` times so a busy machine slows all of them alike."""
    from deploy.runners import make_runner
    torch.manual_seed(0)
    runtime = settings.runtime(input_size)
    if runtime.runtime.compiles:
        # every shape's blocks share one forward: past dynamo's recompile limit (8 shapes) it
        # would silently run them eager. Each call compiles afresh.
        torch._dynamo.reset()
    runners = [make_runner(models.build_model(a).eval(), runtime, a.get("num_classes", 1000)) for a in archs]
    for r in runners:
        r.warmup("eval", 1)
    times = [[] for _ in runners]
    for _ in range(rounds):
        for r, t in zip(runners, times):
            t.append(statistics.median(r.time("eval", 3, 0.2)) * 1e3)
    return [statistics.median(t) for t in times]


def meet_target(plan, model, target_ms=None, target_speedup=None):
    """Plan until the planned shape's measured latency meets the target.

    The first plan aims the prediction at the target; each next one corrects that aim by the
    measured miss, interpolating between the closest aims on either side once the target is
    bracketed. The plan measured closest to the target is returned.

    Args:
        plan: goal_ms -> plan.Cut (plan.plan_cut with the latency goal in predicted ms).
        model: a fitted LatencyModel.
        target_ms / target_speedup: milliseconds per batch, or times faster than the source.
    Returns:
        (Cut, report dict: settings, target, predicted and measured ms, speed-up, attempts).
    """
    goal = target_ms if target_ms is not None else model.predict({}) / target_speedup
    tried = []  # (miss, goal, cut, measured ms, source ms); miss > 0: faster than asked
    for attempt in range(1, ATTEMPTS + 1):
        try:
            cut = plan(goal)
        except UserError:
            if not tried:
                raise
            break  # a corrected aim beyond reach: the closest plan so far stands
        view = model.without(cut.removed)
        archs = [view.arch_of(cut.keep)] + ([model.arch] if target_speedup is not None else [])
        measured = time_shapes(archs, model.input_size, model.settings)
        if target_speedup is not None:
            miss = (measured[1] / measured[0]) / target_speedup - 1
        else:
            miss = target_ms / measured[0] - 1
        tried.append((miss, goal, cut, measured[0], measured[1] if target_speedup is not None else None))
        logger.info("latency plan %d: predicted %.3g ms, measured %.3g ms (%+.1f%% from the target)%s",
                    attempt, view.predict(cut.keep), measured[0], 100 * miss,
                    f", {len(cut.removed)} blocks removed" if cut.removed else "")
        if abs(miss) <= TOLERANCE:
            break
        goal = _next_goal(tried)
    miss, goal, cut, ms, source_ms = min(tried, key=lambda t: abs(t[0]))
    s = model.settings
    report = {"backend": s.backend, "batch": s.batch, "dtype": s.dtype, "threads": torch.get_num_threads(),
              "target_ms": target_ms, "target_speedup": target_speedup,
              "predicted_ms": model.without(cut.removed).predict(cut.keep),
              "measured_ms": ms, "source_ms": source_ms, "speedup": source_ms / ms if source_ms else None,
              "miss": miss, "attempts": len(tried), "fit_errors": model.fit_errors, "cache": model.cache_path}
    return cut, report


def _next_goal(tried):
    """The next predicted-ms aim: between the closest aims that were too fast and too slow
    (linear in the miss), else the last aim scaled by its miss."""
    fast = [(g, m) for m, g, *_ in tried if m > 0]
    slow = [(g, m) for m, g, *_ in tried if m < 0]
    if fast and slow:
        (g1, m1), (g2, m2) = max(fast), min(slow)
        return g1 + (g2 - g1) * m1 / (m1 - m2)
    miss, goal = tried[-1][:2]
    return goal * (1 + miss)
