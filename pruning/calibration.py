"""Calibration evidence for the data-driven criteria (criteria.EVIDENCE: what they read).

A few batches of the training split, seen through the evaluation transform (no augmentation
noise), go through the model in eval mode:
- saliency (taylor): the cross-entropy over all batches is back-propagated once per batch into
  one accumulated gradient; saliency = |w * dL/dw| per parameter (Molchanov et al.'s first order);
- activation: the mean |input| of every channel of every Linear / Conv2d layer, keyed by the
  (weight key, axis) under which the channel groups name that layer's input channels (axis 1,
  or axis 0 of a depthwise conv, whose filters are its input channels).
pruning/scoring.py turns both into per-channel scores of each group.
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


def measure(arch, state_dict, batches, kinds):
    """The calibration evidence pruning/scoring.py reads.

    Args:
        arch: the model's shape (models.build_model).
        state_dict: its weights.
        batches: list of (images, labels).
        kinds: subset of criteria.EVIDENCE.
    Returns:
        {"saliency": key -> |w * grad|, "activation": (key, axis) -> [channels] mean |input|}
        with the kinds asked for.
    """
    unknown = set(kinds) - set(EVIDENCE)
    if unknown:
        raise ValueError(f"unknown calibration evidence {sorted(unknown)}; known: {', '.join(EVIDENCE)}")
    model = models.with_weights(arch, state_dict)
    sums, counts = {}, {}
    handles = _activity_hooks(model, sums, counts) if "activation" in kinds else []
    total = sum(len(y) for _, y in batches)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    try:
        with torch.set_grad_enabled("saliency" in kinds):
            for images, labels in batches:
                loss = loss_fn(model(images), labels) / total
                if "saliency" in kinds:
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
    evidence = {}
    if "saliency" in kinds:
        evidence["saliency"] = {k: (p.detach() * p.grad).abs().double() if p.grad is not None
                              else torch.zeros_like(p, dtype=torch.float64)
                              for k, p in model.named_parameters()}
    if "activation" in kinds:
        evidence["activation"] = {k: sums[k] / counts[k] for k in sums}
    return evidence
