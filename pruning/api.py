"""Pruning as a Python call: `prune(source, spec) -> Result` (prune.py and the studies are thin
layers over it).

    from pruning import KeepRules, PruneSpec, prune
    result = prune(model, PruneSpec(criterion="opnorm", rules=KeepRules(dims=[32, 64, 128, 256])))
    result.model          # the smaller dense model, weights loaded, eval mode
    result.save("pruned.pth")

`source` is a checkpoint path or http(s) URL, a loaded checkpoint dict, a live model of one
of this toolkit's families, or a `Source` from `open_source` (reused across many prunings).
Domain errors are `errors.UserError` with a plain message.
"""
import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn as nn

import models
from checkpoints.identity import DEFAULT_INPUT_SIZE, load_model_state, read_held
from checkpoints.io import load_checkpoint_file, save_checkpoint_file, save_weights_file
from checkpoints.sources import local_copy
from common.errors import UserError
from common.files import atomic_open, sha256_file
from models import traced

from .calibration import calibration_batches, measure
from .compensate import compensate
from .costs import CostModel
from .latency import LatencyModel, LatencySettings, meet_target
from .blocks import check_depth_rules, score_blocks
from .plan import plan_cut
from .scoring import score_groups
from .spec import PruneSpec
from .surgery import prune_checkpoint, read_source, renamed_key


@dataclass
class Source:
    """A checkpoint opened for pruning.

    label: how it is named (path, URL or "in-memory ..."); held: checkpoint.Held; sds: state
    dicts by checkpoint key; scored: the key whose weights are scored; arch; groups: its
    channel groups; sha256: of the file (None in memory).
    """
    label: str
    held: object
    sds: dict
    scored: str
    arch: dict
    groups: list
    sha256: str | None
    _sizes_checked: set = field(default_factory=set, repr=False)
    _batches: dict = field(default_factory=dict, repr=False)

    @property
    def ckpt(self):
        return self.held.ckpt

    @property
    def kept_whole(self):
        """Traced models: channel set (named by its first writer) -> why it is never cut."""
        return dict(traced.analysis(self.arch).whole) if self.arch.get("family") == "traced" else {}

    @cached_property
    def blocks(self):
        """The blocks depth pruning may remove (models.removable_blocks)."""
        return models.removable_blocks(self.arch)

    @property
    def depths(self):
        """Blocks per stage, removable or not."""
        return models.FAMILIES[self.arch["family"]].stage_depths(self.arch) if self.blocks else []

    def check_input_size(self, size):
        """Refuse an input size the model cannot take (measured once per size, not per cell)."""
        if size not in self._sizes_checked:
            self.held.check_size(size)
            self._sizes_checked.add(size)

    def _own_batches(self, data):
        """Calibration batches given in Python, checked against the model before any use."""
        try:
            batches = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in data]
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"calibration data must be (images, labels) pairs of tensors ({e})") from None
        if not batches:
            raise UserError("calibration data holds no batches")
        chans, classes = self.arch.get("in_chans", 3), self.held.num_classes or self.arch.get("num_classes")
        for i, (x, y) in enumerate(batches):
            where = f"calibration batch {i}"
            if x.dim() != 4 or not x.is_floating_point() or x.shape[1] != chans:
                raise UserError(f"{where}: images must be float [N, {chans}, H, W], got {x.dtype} {tuple(x.shape)}")
            if y.dim() != 1 or y.dtype.is_floating_point or len(y) != len(x):
                raise UserError(f"{where}: labels must be {len(x)} integers, got {y.dtype} {tuple(y.shape)}")
            if classes and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise UserError(f"{where}: labels must be in [0, {classes}), got {int(y.min())}..{int(y.max())}")
            if not bool(torch.isfinite(x).all()):
                raise UserError(f"{where}: images hold NaN or infinite values")
            self.check_input_size(x.shape[-1])
        return batches

    def calibration(self, calib, input_size, seed):
        """(batches, data set name) of a Calibration: its own data, or training images drawn
        with `seed` (the last draw is kept: a study's cells of one seed read it once)."""
        if calib.data is not None:
            return self._own_batches(calib.data), "(batches given in Python)"
        key = (calib, input_size, seed)
        if calib.data_set is None and not self.held.trained.get("data_set"):
            raise UserError(f"{self.label} does not record the data it was trained on: give the "
                            "calibration images (--data_set and --data_path, or Calibration(data=...))")
        if key not in self._batches:
            data = self.held.data_args(calib.data_set, calib.data_path, input_size)
            models.check_memory(models.meta_model(self.arch), data.input_size, calib.batch_size, True)
            self._batches.clear()
            self._batches[key] = calibration_batches(data, calib.batches, calib.batch_size, seed)[0], data.data_set
        return self._batches[key]


def open_source(source, *, model=None, use_ema=False, input_size=None, trace=False):
    """A Source from a path / URL, a checkpoint dict, a live model, or a Source.

    Args:
        model: a registered model the weights must have the shape of: ours, a stock timm name
            or `torchvision:NAME` (those two are traced).
        use_ema: score the checkpoint's model_ema weights.
        input_size: the side of the example input a traced model runs on (default 224).
        trace: trace a model even where its family declares its groups.
    """
    if isinstance(source, Source):
        if use_ema and source.scored != "model_ema":
            raise UserError("use_ema: this Source was opened without it")
        return source
    if isinstance(source, (str, os.PathLike)):
        local = local_copy(source)
        ckpt, label, sha = load_checkpoint_file(local), os.fspath(source), sha256_file(local)
    elif isinstance(source, dict):
        ckpt, label, sha = source, "in-memory checkpoint", None
    elif isinstance(source, nn.Module):
        state = {k: v.detach().to("cpu", copy=True) for k, v in source.state_dict().items()}
        declared = isinstance(getattr(source, "arch", None), dict) and not trace
        arch = dict(source.arch) if declared else traced.arch_of_model(source, input_size or DEFAULT_INPUT_SIZE)
        ckpt, label, sha = {"model": state, "arch": arch}, f"in-memory {type(source).__name__}", None
    else:
        raise UserError(f"cannot prune a {type(source).__name__}: give a checkpoint path or URL, "
                        "a checkpoint dict, or a model of this toolkit")
    held = read_held(ckpt, model)
    sds, scored, arch = read_source(held, model, use_ema, input_size or held.input_size())
    if trace and arch["family"] != "traced":
        arch = traced.arch_of_model(models.with_weights(arch, held.state), input_size or held.input_size())
    source = Source(label, held, sds, scored, arch, models.channel_groups(arch), sha)
    if not source.groups:
        whole = [f"{k}: {v}" for k, v in source.kept_whole.items() if v != "the model's output"][:3]
        why = (f"; kept whole: {'; '.join(whole)}" if whole else "; no conv or Linear reads a weight as stored "
               "(weights computed in the forward are not followed)")
        raise UserError(f"{label}: no channel group can be cut{why}")
    return source


@dataclass
class Evidence:
    """Calibration measurements (calibration.measure's dict), the images and data they came from."""
    tensors: dict
    images: int
    batches: int
    data_set: str


def calibrate(spec, source):
    """The Evidence for a resolved spec's data-driven criterion, or None for a data-free one."""
    crit = spec.criterion
    if crit.evidence is None:
        return None
    batches, name = source.calibration(spec.calibration, spec.input_size, spec.seed)
    tensors = measure(source.arch, source.sds[source.scored], batches, (crit.evidence,))
    return Evidence(tensors, sum(len(y) for _, y in batches), len(batches), name)


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


@dataclass
class Result:
    """A pruning's outcome.

    checkpoint: the pruned checkpoint dict (weights, arch, args, `pruning` provenance);
    keep: group name -> kept channel indices; scores: group name -> scoring.GroupScores;
    spec: the resolved PruneSpec actually used; source: the Source;
    evidence: the calibration Evidence of a data-driven criterion (None otherwise);
    latency: with a latency target, its measurement (latency.meet_target's report);
    block_scores: with a depth rule, block name -> the criterion's score of every removable block.
    """
    checkpoint: dict
    keep: dict
    scores: dict
    spec: PruneSpec
    source: Source
    evidence: Evidence | None = None
    latency: dict | None = None
    block_scores: dict | None = None

    @property
    def removed_blocks(self):
        """The source's blocks the cut removed, lowest score first: [{"name", "score"}]."""
        return list(self.checkpoint["pruning"].get("removed_blocks", []))

    @property
    def arch(self):
        return self.checkpoint["arch"]

    @property
    def kept_whole(self):
        """Channel sets never cut, with the reason: what the trace could not follow, and groups
        kept whole after a cut the model's code did not take (traced models; {} otherwise)."""
        return {**self.source.kept_whole, **self.checkpoint["pruning"].get("kept_whole", {})}

    @cached_property
    def model(self):
        """The pruned model with its weights, in eval mode."""
        return models.with_weights(self.arch, self.checkpoint["model"])

    def table(self):
        """The before/after lines: params, MACs at the spec's input size, the family's widths."""
        size = self.spec.input_size
        before, after = _summary(self.source.arch, size), _summary(self.arch, size)
        rows = [("", "source", "pruned", "")]
        for label, i in (("params", 0), (f"MACs @{size}px", 1)):
            share = f"{after[i] / before[i]:.1%}" if before[i] else ""
            rows.append((label, f"{before[i]:,}", f"{after[i]:,}", share))
        rows += [(label, a, b, "") for (label, a), (_, b) in zip(before[2], after[2])]
        w = [max(len(r[c]) for r in rows) for c in range(4)]
        return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}".rstrip() for r in rows)

    def save(self, path, overwrite=False):
        """Write the pruned checkpoint (atomically); an existing file only with overwrite. A
        `.safetensors` path gets the model weights with arch, args and the pruning record
        as metadata (no pickle, no model_ema); any other name a torch.save checkpoint."""
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if os.fspath(path).endswith(".safetensors"):
            save_weights_file(self.checkpoint, path)
        else:
            save_checkpoint_file(self.checkpoint, path)

    def export_scores(self, path):
        """Per-group scores, each source's row (null where it does not cover) and the kept
        indices, and with a depth rule every removable block's score, as JSON."""
        data = {"provenance": self.checkpoint["pruning"], "groups": {}, "blocks": self.block_scores}
        for g in self.source.groups:
            s = self.scores[g.name]
            data["groups"][g.name] = {
                "kind": g.kind, "stage": g.stage, "width": g.width, "kept": [int(i) for i in self.keep[g.name]],
                "score": None if s is None else s.score.tolist(),
                "sources": {} if s is None else {k: [None if math.isnan(x) else x for x in v.tolist()]
                                                 for k, v in s.sources.items()}}
        with atomic_open(path) as f:
            json.dump(data, f)


def load(path, *, model=None):
    """The model a checkpoint file holds, rebuilt without running code from the file.

    A pruned timm / torchvision model is built by its library on the meta device, each tensor
    resized to the shape the file records, the weights loaded and every key checked; our
    families build from their `arch`. A model of your own class needs `model=`: a fresh
    instance, resized in place and returned.

    Args:
        path: a checkpoint path or URL (.pth or .safetensors).
        model: an instance of the class the file was pruned from (required for your own class).
    Returns:
        the model with its weights, in eval mode.
    """
    held = read_held(load_checkpoint_file(local_copy(path)))
    arch = held.arch
    if arch is not None and arch.get("family") == "traced" and arch["builder"].get("kind") == "module" and model is None:
        raise UserError(f"{path} holds a {arch['builder'].get('class')} of your own: pass model=a_fresh_instance")
    if model is None:
        built = held.build()
        load_model_state(built, held.state, os.fspath(path))
        return built.eval()
    if arch is None or arch.get("family") != "traced":
        raise UserError(f"model=: {path} holds {held.label}, which builds itself; leave model= out")
    builder = arch["builder"]
    if builder.get("kind") == "module":  # the fresh instance, before resizing, is what builds it again
        arch = {**arch, "builder": traced.adopt_template(builder, copy.deepcopy(model))}
    else:
        with torch.device("meta"):
            want = traced.build(builder)
        if type(want) is not type(model):
            raise UserError(f"model=: {path} holds a {type(want).__name__}, the model given is a "
                            f"{type(model).__qualname__}")
    target = traced.resize(model, arch.get("shapes", {}))
    models.check_arch_matches(target, held.state, os.fspath(path), "the model given")
    target.load_state_dict(models.weights.with_own_metadata(target, held.state))
    target.arch = dict(arch)
    return target.eval()


def _summary(arch, input_size):
    params, macs = models.count_arch(arch, input_size)
    return params, macs, models.FAMILIES[arch["family"]].widths(arch)


def _compensate(src, spec, keep, pruned, removed):
    """Apply spec.compensate to every state dict of the pruned checkpoint, in place."""
    batches, name = src.calibration(spec.calibration, spec.input_size, spec.seed)
    blocks = src.blocks if removed else []

    def renamed(module):  # a source module's name in the pruned model (None: removed)
        key = renamed_key(module + ".", blocks, removed)
        return None if key is None else key[:-1]
    for key in list(src.sds):
        pruned[key], report = compensate(src.arch, src.sds[key], pruned["arch"], pruned[key], src.groups, keep,
                                         batches, spec.compensate, renamed)
    pruned["pruning"]["compensation"] = {"method": spec.compensate, "data_set": name,
                                         "images": sum(len(y) for _, y in batches), **report}


def prune(source, spec, *, evidence=None):
    """Prune `source` as `spec` says.

    Args:
        source: a checkpoint path or URL, a checkpoint dict, a live model of ours, or a Source.
        spec: a PruneSpec.
        evidence: an Evidence from `calibrate` to reuse (studies); None measures it.
    Returns:
        Result.
    """
    if not isinstance(spec, PruneSpec):
        raise TypeError(f"spec must be a PruneSpec, not {type(spec).__name__}")
    spec = spec.resolved()
    src = open_source(source, model=spec.model, use_ema=spec.use_ema, input_size=spec.input_size, trace=spec.trace)
    spec = replace(spec, input_size=src.held.input_size(spec.input_size))
    src.check_input_size(spec.input_size)
    check_depth_rules(spec.rules, src.blocks, len(src.depths))
    if evidence is None:
        evidence = calibrate(spec, src)
    tensors = evidence.tensors if evidence else None
    with one_thread():
        scores = score_groups(src.sds[src.scored], src.groups, spec.criterion, aggregation=spec.aggregation,
                              raw_weights=spec.raw_weights, seed=spec.seed or 0,
                              evidence=tensors) if spec.rules.prunes_width else {g.name: None for g in src.groups}
        block_scores = score_blocks(src.sds[src.scored], src.blocks, spec.criterion, seed=spec.seed or 0,
                                    evidence=tensors) if spec.rules.prunes_depth else None
    options = spec.record()
    if evidence is not None:
        options["data_set"] = evidence.data_set  # the data the evidence came from, also a default one
    provenance = {"criterion": spec.criterion.name, "options": options,
                  "source": os.path.basename(src.label), "source_sha256": src.sha256,
                  "scored_weights": src.scored, "torch": str(torch.__version__)}
    cut, latency, pruned = _cut_as_planned(src, spec, scores, block_scores, provenance)
    if latency is not None:
        pruned["pruning"]["latency"] = latency
    if spec.compensate != "none":
        _compensate(src, spec, cut.keep, pruned, cut.removed)
    return Result(pruned, cut.keep, scores, spec, src, evidence, latency, block_scores)


REPLANS = 8  # traced models: groups a failed cut names are kept whole, at most this many times


def _cut_as_planned(src, spec, scores, block_scores, provenance):
    """(plan.Cut, latency report, pruned checkpoint). A traced model's pruned shape is traced
    again; where its code fixes a size (the cut does not run, or a group comes out otherwise),
    the groups writing into that module are kept whole and the plan is made again."""
    held_whole = {}
    for _ in range(REPLANS):
        cut, latency = _plan(src, spec, scores, block_scores, exclude=held_whole)
        pruned = prune_checkpoint(src.ckpt, src.sds, src.groups, cut.keep, src.arch, provenance, cut.removed)
        if src.arch["family"] != "traced":
            return cut, latency, pruned
        try:
            traced.check_pruned(src.arch, pruned["arch"], cut.keep)
        except traced.NotAsPlanned as e:
            at = e.module
            stuck = {g.name for g in src.groups if g.name == at or (at and any(
                p.key.startswith(at + ".") for p in g.slices))} - set(held_whole)
            if not stuck or len(held_whole) + len(stuck) == len(src.groups):
                raise  # nothing left to cut
            held_whole.update({n: f"kept whole after a cut failed ({e})" for n in stuck})
            continue
        if held_whole:
            pruned["pruning"]["kept_whole"] = held_whole
        return cut, latency, pruned
    raise UserError(f"{src.label}: no plan runs after keeping {len(held_whole)} groups whole")


def _plan(src, spec, scores, block_scores, exclude=()):
    """(plan.Cut, latency report or None): the plan (groups in `exclude` keep every channel);
    with a latency target, planned against this machine's latency model and checked by timing
    (outside one_thread: the runtime's own thread count)."""
    groups = [g for g in src.groups if g.name not in exclude]
    rules = spec.rules
    cost_model = CostModel(src.arch, src.groups, spec.input_size) if rules.reads_cost else None
    depth = {"blocks": src.blocks, "block_scores": block_scores, "depths": src.depths}
    if not rules.latency_targeted:
        with one_thread():
            return plan_cut(groups, scores, rules, cost_model=cost_model, **depth), None
    models.check_memory(models.meta_model(src.arch), spec.input_size, rules.latency_batch, False)  # --latency_batch
    settings = LatencySettings(rules.latency_backend, rules.latency_batch, rules.latency_dtype)
    model = LatencyModel(src.arch, src.groups, spec.input_size, settings).load_or_fit()

    def plan(goal):
        with one_thread():
            return plan_cut(groups, scores, rules, cost_model=cost_model, latency=(model, goal), **depth)
    return meet_target(plan, model, rules.target_latency, rules.target_speedup)
