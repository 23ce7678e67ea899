"""Calibration evidence for the data-driven criteria (criteria.EVIDENCE: what they read).

A few batches of the training split, seen through the evaluation transform (no augmentation
noise), go through the model in eval mode:
- saliency (taylor): the cross-entropy over all batches is back-propagated once per batch into
  one accumulated gradient; saliency = |w * dL/dw| per parameter (Molchanov et al.'s first order),
  and each batch's signed sum of w * dL/dw per tensor (taylor's block score);
- activation: the mean |input| of every channel of every Linear / Conv2d layer, keyed by the
  (weight key, axis) under which the channel groups name that layer's input channels (axis 1,
  or axis 0 of a depthwise conv, whose filters are its input channels);
- skip: per removable block, the change of the logits with its branch zeroed (one more forward
  over the batches per block) and of its output against its input (skip_logits, skip_output).
pruning/scoring.py turns the first two into per-channel scores of each group, pruning/blocks.py
the rest into block scores.
"""
import torch
import torch.nn as nn

import models

from .criteria import EVIDENCE


def calibration_batches(data_args, n_batches, batch_size, seed):
    """n_batches of (images, labels) drawn without replacement from the training split.

    Args:
        data_args: namespace of the data flags (datasets.default_data_args).
        n_batches, batch_size: how many images (fewer when the split is smaller).
        seed: which images (a seeded permutation).
    Returns:
        (list of (images, labels), images used).
    """
    import datasets  # here: pruning without calibration never loads torchvision
    dataset, _ = datasets.build_dataset(is_train=True, args=data_args, augment=False)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(dataset), generator=gen)[:n_batches * batch_size].tolist()
    return stacked_batches(dataset, order, batch_size), len(order)


def stacked_batches(dataset, index, batch_size):
    """The images `index` names, in that order, as in-memory (images, labels) batches."""
    batches = []
    for start in range(0, len(index), batch_size):
        items = [dataset[i] for i in index[start:start + batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
    return batches


def _input_axis(module):
    """The weight axis that indexes a layer's input channels, or None for other layers."""
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return 0 if depthwise else 1
    return None


def _activity_hooks(model, sums, counts):
    handles = []
    for name, module in model.named_modules():
        axis = _input_axis(module)
        if axis is None:
            continue
        key = (f"{name}.weight", axis)

        def hook(mod, inputs, key=key):
            x = inputs[0].detach().abs()
            x = x.movedim(1, -1) if isinstance(mod, nn.Conv2d) else x  # channels last
            flat = x.reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + flat.sum(dim=0)
            counts[key] = counts.get(key, 0) + flat.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def skip_changes(model, arch, batches):
    """Per removable block, on the batches: {"logits": sum ||z_skip - z||^2 / sum ||z||^2 with
    the block's branch zeroed (its gain tensors), "output": sum ||out - in||^2 / sum ||in||^2
    of the block in the dense forward}."""
    blocks = models.removable_blocks(arch)
    params = dict(model.named_parameters())
    sq = {b.name: [0.0, 0.0] for b in blocks}

    def hook(mod, inputs, output, name):
        sq[name][0] += float((output - inputs[0]).double().square().sum())
        sq[name][1] += float(inputs[0].double().square().sum())
    handles = [model.get_submodule(b.name).register_forward_hook(
        lambda m, i, o, name=b.name: hook(m, i, o, name)) for b in blocks]
    with torch.no_grad():
        try:
            dense = [model(x).double() for x, _ in batches]
        finally:
            for h in handles:
                h.remove()
        energy = sum(float(z.square().sum()) for z in dense)
        logits = {}
        for b in blocks:
            saved = {k: params[k].detach().clone() for k in b.gain}
            for k in b.gain:
                params[k].zero_()
            try:
                moved = sum(float((model(x).double() - z).square().sum()) for (x, _), z in zip(batches, dense))
            finally:
                for k, v in saved.items():
                    params[k].copy_(v)
            logits[b.name] = moved / max(energy, 1e-300)
    return {"logits": logits, "output": {n: a / max(b, 1e-300) for n, (a, b) in sq.items()}}


def measure(arch, state_dict, batches, kinds):
    """The calibration evidence pruning/scoring.py reads.

    Args:
        arch: the model's shape (models.build_model).
        state_dict: its weights.
        batches: list of (images, labels).
        kinds: subset of criteria.EVIDENCE.
    Returns:
        {"saliency": key -> |w * grad| (and "saliency_sums": key -> [per batch sum of w * grad]),
         "activation": (key, axis) -> [channels] mean |input|, "skip": skip_changes'} with the
        kinds asked for.
    """
    unknown = set(kinds) - set(EVIDENCE)
    if unknown:
        raise ValueError(f"unknown calibration evidence {sorted(unknown)}; known: {', '.join(EVIDENCE)}")
    model = models.with_weights(arch, state_dict)
    sums, counts = {}, {}
    handles = _activity_hooks(model, sums, counts) if "activation" in kinds else []
    total = sum(len(y) for _, y in batches)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    params = dict(model.named_parameters())
    batch_sums = {k: [] for k in params}  # sum of w * dL/dw of each batch's loss, per tensor
    try:
        with torch.set_grad_enabled("saliency" in kinds):
            for images, labels in batches:
                loss = loss_fn(model(images), labels) / total
                if "saliency" in kinds:  # accumulated as backward() would, and kept per batch
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    for (k, p), g in zip(params.items(), grads):
                        g = torch.zeros_like(p) if g is None else g
                        batch_sums[k].append(float((p.detach().double() * g.double()).sum()) * total / len(labels))
                        p.grad = g if p.grad is None else p.grad + g
    finally:
        for h in handles:
            h.remove()
    evidence = {}
    if "saliency" in kinds:
        evidence["saliency"] = {k: (p.detach() * p.grad).abs().double() if p.grad is not None
                              else torch.zeros_like(p, dtype=torch.float64)
                              for k, p in model.named_parameters()}
        evidence["saliency_sums"] = batch_sums
    if "skip" in kinds:
        evidence["skip"] = skip_changes(model, arch, batches)
    if "activation" in kinds:
        evidence["activation"] = {k: sums[k] / counts[k] for k in sums}
    return evidence
