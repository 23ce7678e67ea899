"""Checkpoint surgery: cut every tensor slice of every channel group to its kept indices.

`prune_state_dict` is a pure function on state dicts; `read_source` and `prune_checkpoint`
deal with the checkpoint around it (our format with `arch`, or a released official /
Efficient ConvNeXt / seed file with a `model` state dict and no `arch`).
"""

import math

import torch

import models
from models import traced
from checkpoints.identity import Held, args_to_dict, read_held
from common.errors import UserError

from models.groups import part_span, part_stop


def _check_keep(group, idx):
    idx = torch.as_tensor(idx, dtype=torch.int64)
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"group {group.name}: kept indices must be a non-empty 1-D list")
    if bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= group.width:
        raise ValueError(f"group {group.name}: kept indices must be sorted, unique and in "
                         f"[0, {group.width})")
    return idx


def _positions(part, chosen):
    """Positions along the part's axis of its channels where the bool row `chosen` is set."""
    channels = chosen.nonzero().flatten()
    return (part.offset + channels[:, None] * part.block + torch.arange(part.block)).flatten()


def cut_positions(shapes, groups, keep):
    """The kept positions of every tensor axis some group cuts.

    A tensor axis may hold several groups' channels (a concatenation's consumer) at offsets,
    each channel owning a block of positions (a Linear after a flatten); positions no group
    holds stay.

    Args:
        shapes: dict key -> tensor shape.
        groups: channel groups of the shape.
        keep: dict group name -> sorted kept indices; absent groups keep every channel.
    Returns:
        dict (key, axis) -> 1-D int64 tensor of kept positions (only axes that lose some).
    """
    masks = {}
    for g in groups:
        if g.name not in keep:
            continue
        idx = _check_keep(g, keep[g.name])
        if idx.numel() == g.width:
            continue
        dropped = torch.ones(g.width, dtype=torch.bool)
        dropped[idx] = False
        for part in g.slices:
            if part.key not in shapes:
                raise UserError(f"the checkpoint lacks {part.key}, which group {g.name} cuts")
            size = shapes[part.key][part.axis]
            if size < part_span(part, g.width):
                raise UserError(f"{part.key} has {size} channels on axis {part.axis}; "
                                f"group {g.name} expects {part_span(part, g.width)}")
            mask = masks.setdefault((part.key, part.axis), torch.ones(size, dtype=torch.bool))
            mask[_positions(part, dropped[part.start:part_stop(part, g.width)])] = False
    return {ka: m.nonzero().flatten() for ka, m in masks.items()}


def prune_state_dict(state_dict, groups, keep):
    """A new state dict with each group's slices cut to `keep[group.name]`.

    Tensors no group touches are carried over as they are (shared, not copied). A tensor cut
    by two groups (pwconv1.weight: hidden rows, residual columns) is cut on both axes.

    Args:
        state_dict: source tensors (not modified).
        groups: models.channel_groups(arch) of the source shape.
        keep: dict group name -> sorted kept indices; absent groups keep every channel.
    Returns:
        dict key -> tensor.
    """
    out = dict(state_dict)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for (key, axis), kept in cut_positions(shapes, groups, keep).items():
        out[key] = out[key].index_select(axis, kept.to(out[key].device))
    return out


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def silence(state_dict, groups, keep):
    """The source with the channels a plan cuts made dead: their rows zeroed in every slice
    that writes them (producer rows, biases, norm affines; statistics stay). Through
    BatchNorm networks this model's logits equal the pruned model's: the exactness check."""
    out = dict(state_dict)
    for g in groups:
        idx = _check_keep(g, keep.get(g.name, range(g.width)))
        dead = torch.ones(g.width, dtype=torch.bool)
        dead[idx] = False
        for part in g.slices:
            if part.axis != 0 or part.key.rpartition(".")[2] in _STATISTICS:
                continue
            out[part.key] = out[part.key].clone()
            out[part.key][_positions(part, dead[part.start:part_stop(part, g.width)])] = 0
    return out


def renamed_key(key, blocks, removed):
    """A source key's name once the `removed` blocks are gone: None for their own tensors;
    a later block of the same container has its index lowered by the removed ones before it.

    Args:
        blocks: the source's removable blocks (models.removable_blocks).
        removed: names of the blocks removed.
    """
    gone = [b for b in blocks if b.name in removed]
    if any(b.owns(key) for b in gone):
        return None
    for container in {b.container for b in gone}:
        head, _, rest = key[len(container) + 1:].partition(".")
        if key.startswith(container + ".") and head.isdigit():
            shift = sum(1 for b in gone if b.container == container and b.index < int(head))
            return f"{container}.{int(head) - shift}.{rest}"
    return key


def remove_blocks(state_dict, blocks, removed):
    """The state dict without the removed blocks' tensors, the later blocks renumbered."""
    out = {}
    for key, value in state_dict.items():
        new = renamed_key(key, blocks, removed)
        if new is not None:
            out[new] = value
    return out


def silence_blocks(state_dict, blocks, removed):
    """The source with the removed blocks' branches zeroed (their `gain` tensors: layer scale,
    the last BatchNorm's affine), so each adds nothing: the depth exactness check."""
    out = dict(state_dict)
    for b in blocks:
        if b.name in removed:
            for key in b.gain:
                out[key] = torch.zeros_like(out[key])
    return out


def read_source(ckpt, model_name=None, use_ema=False, input_size=None):
    """The state dicts and shape of a checkpoint.

    Args:
        ckpt: a loaded checkpoint, or its checkpoint.Held (read with `model_name`).
        model_name: a registered model whose shape the weights must have (ours; a stock timm
            name or `torchvision:NAME` is traced), or None to use the checkpoint's `arch`, else
            the shape inferred from the tensors.
        use_ema: score the `model_ema` weights instead of `model`.
        input_size: the example input side a traced model is read at (default 224).
    Returns:
        (state dicts by checkpoint key, the key whose weights are scored, arch).
    """
    held = ckpt if isinstance(ckpt, Held) else read_held(ckpt, model_name)
    ckpt = held.ckpt
    sds = {"model": held.state}
    ema = ckpt.get("model_ema") if isinstance(ckpt, dict) else None
    if isinstance(ema, dict) and ema:
        sds["model_ema"] = ema
    if use_ema and "model_ema" not in sds:
        raise UserError("--use_ema: the checkpoint has no model_ema weights")
    arch = _resolve_arch(held, input_size)
    what = f"--model {model_name}" if model_name else "the checkpoint's own `arch` entry"
    meta = models.meta_model(arch)
    models.check_arch_matches(meta, sds["model"], model_name=what)
    arch = {**arch, **getattr(meta, "arch", {})}  # complete a partial stored arch (groups need all fields)
    if "model_ema" in sds:
        shapes = {k: tuple(v.shape) for k, v in sds["model"].items()}
        if {k: tuple(v.shape) for k, v in sds["model_ema"].items()} != shapes:
            raise UserError("the checkpoint's model_ema weights do not have the shape of its model weights")
        bad = models.weights.nonfinite_keys(sds["model_ema"])
        if bad:  # the pruned file would carry them on, and --model_ema_eval would evaluate them
            raise UserError(f"the checkpoint's model_ema weights hold NaN or infinite values ({len(bad)} "
                            f"tensors, e.g. {bad[0]}); prune a checkpoint whose EMA is finite")
    return sds, ("model_ema" if use_ema else "model"), arch


def _resolve_arch(held, input_size=None):
    if held.arch is not None and held.arch.get("family") == "traced" and input_size:
        return {**held.arch, "input_size": int(input_size)}  # traced at the size pruning counts at
    if held.arch is not None:
        return dict(held.arch)
    name, sd = models.base_name(held.name), held.state
    builder = traced.builder_of_name(held.name)
    if builder is not None:
        return traced.arch_of_weights(builder, sd, input_size or held.input_size())
    if name not in models.OUR_MODELS:
        raise UserError(f"--model {name}: pruning needs one of this toolkit's models (see the "
                        "docs/models.md's model zoo), whose channel groups it knows")
    arch = dict(models.default_arch(name))
    try:  # the class count the weights hold, whatever the family's head is called
        arch["num_classes"] = models.infer_arch(sd)["num_classes"]
    except UserError:
        pass  # an unknown layout: check_arch_matches names the mismatch
    return arch


def new_arch(source_arch, state_dict):
    """The pruned shape: read off the new tensors by the family, other source fields carried over."""
    return models.FAMILIES[source_arch["family"]].arch_after(source_arch, state_dict)


def _one_number(value):
    """A plain int / float of a number or one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def prune_checkpoint(ckpt, sds, groups, keep, source_arch, provenance, removed=None):
    """The pruned checkpoint: the same cut on every state dict, optimizer and scaler dropped.

    Args:
        ckpt: the loaded source checkpoint.
        sds: its state dicts by key (from read_source).
        groups: channel groups of the source shape.
        keep: dict group name -> kept indices.
        source_arch: the source shape.
        provenance: dict recorded under `pruning` (criterion, options, source sha256, ...).
        removed: blocks removed (depth pruning), name -> score, recorded as `removed_blocks`.
    Returns:
        dict with model (+ model_ema), args, arch and pruning.
    """
    blocks = models.removable_blocks(source_arch) if removed else []
    out = {key: remove_blocks(prune_state_dict(sd, groups, keep), blocks, removed or {}) for key, sd in sds.items()}
    out["args"] = args_to_dict(ckpt.get("args") if isinstance(ckpt, dict) else None)
    out["arch"] = new_arch(source_arch, out["model"])
    record = dict(provenance)
    record["kept"] = {name: [int(i) for i in idx] for name, idx in keep.items()}
    record["source_arch"] = source_arch
    if removed:
        record["removed_blocks"] = [{"name": n, "score": s} for n, s in removed.items()]
    for key in ("epoch", "max_accuracy"):
        value = _one_number(ckpt.get(key)) if isinstance(ckpt, dict) else None
        if value is not None:  # provenance only: a damaged value is left out, never a crash
            record[f"source_{key}"] = value
    out["pruning"] = record
    return out
