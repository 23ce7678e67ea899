"""optim_factory.py: weight-decay groups, layer-wise LR decay ids, optimizer creation."""
import argparse
import re

import pytest
import timm
import torch

import models
from models.convnext import ConvNeXt
from optim_factory import (LayerDecayValueAssigner, create_optimizer,
                           get_parameter_groups)
from common.errors import UserError


def meta_model(name, **kwargs):
    """Build without allocating weights: only parameter names and shapes matter here."""
    with torch.device("meta"):
        return models.create_model(name, **kwargs)


def opt_args(**kw):
    base = dict(opt="adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, opt_eps=1e-8, opt_betas=None)
    return argparse.Namespace(**{**base, **kw})


def official_convnext_layer_id(name):
    """The official repo's mapping, written out for [3, 3, 27, 3] (12 layers)."""
    if name.startswith("downsample_layers"):
        stage = int(name.split(".")[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
    if name.startswith("stages"):
        stage, block = int(name.split(".")[1]), int(name.split(".")[2])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return 13


def forward_order_key(name):
    """Sort key following the data flow: stem, then per stage (downsample, blocks), then rest."""
    m = re.match(r"(downsample_layers|stages)\.(\d+)\.(?:blocks\.|downsample\.)?(\d+)?", name)
    if name.startswith(("stem", "downsample_layers.0.")):
        return (0, 0, 0)
    if m:
        is_block = m.group(1) == "stages" and ".downsample." not in name
        return (1, int(m.group(2)), 1 + int(m.group(3)) if is_block else 0)
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), 0)
    return (2, 0, 0)


def test_official_mapping_is_reproduced_for_convnext_small():
    model = meta_model("convnext_small")
    names = [n for n, _ in model.named_parameters()]
    ids, num_layers = ConvNeXt.layer_ids(names)
    assert num_layers == 12
    assert ids == {n: official_convnext_layer_id(n) for n in names}


@pytest.mark.parametrize("build", [
    lambda: meta_model("convnext_tiny"),
    lambda: meta_model("convnext_tiny_3M_pruned_cifar10"),
    lambda: meta_model("convnext_ms_tiny"),
    lambda: meta_model("convnext_isotropic_small"),
    lambda: models.build_model({"family": "convnext", "depths": [2, 5, 1], "dims": [8, 16, 24],
                                "hidden": None, "dw": "standard", "dw_branches": None,
                                "num_classes": 3, "in_chans": 3}),
    lambda: timm.create_model("convnext_atto", pretrained=False),   # timm's key layout
], ids=["tiny", "3M", "multiscale", "isotropic", "3-stage", "timm-layout"])
def test_layer_ids_cover_all_params_and_are_monotone(build):
    model = build()
    assigner = LayerDecayValueAssigner(model, 0.7)
    names = sorted((n for n, _ in model.named_parameters()), key=forward_order_key)
    ids = [assigner.get_layer_id(n) for n in names]
    assert len(ids) == len(list(model.parameters()))
    assert all(0 <= i <= assigner.num_layers + 1 for i in ids)
    assert ids == sorted(ids), "layer ids must not decrease along the data flow"
    assert ids[0] == 0 and assigner.get_layer_id("head.weight") == assigner.num_layers + 1
    assert set(ids) == set(range(assigner.num_layers + 2)), "every layer id is used"
    scales = [assigner.get_scale(i) for i in ids]
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.7 ** (assigner.num_layers + 1))


def test_unknown_layout_is_one_layer():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assigner = LayerDecayValueAssigner(model, 0.5)
    assert assigner.num_layers == 0
    assert {assigner.get_scale(assigner.get_layer_id(n)) for n, _ in model.named_parameters()} == {1.0}


def test_no_weight_decay_groups():
    model = models.create_model("convnext_tiny_3M_pruned_cifar10")
    groups = get_parameter_groups(model, weight_decay=0.05, skip_list={"head.weight"})
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        no_wd = p.ndim <= 1 or name.endswith(".bias") or name == "head.weight"
        assert by_id[id(p)]["weight_decay"] == (0.0 if no_wd else 0.05), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_groups_carry_scales():
    model = models.create_model("convnext_tiny_3M_pruned_cifar10")
    assigner = LayerDecayValueAssigner(model, 0.8)
    optimizer = create_optimizer(opt_args(), model, assigner.get_layer_id, assigner.get_scale)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.8 ** (assigner.num_layers + 1))
    assert len(optimizer.param_groups) == 2 * (assigner.num_layers + 2)


def test_optimizers_by_official_names():
    model = torch.nn.Linear(3, 2)
    adamw = create_optimizer(opt_args(opt="adamw", opt_betas=[0.8, 0.95], opt_eps=1e-6), model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    sgd = create_optimizer(opt_args(opt="sgd", momentum=0.8), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    assert not create_optimizer(opt_args(opt="momentum"), model).defaults["nesterov"]
    assert type(create_optimizer(opt_args(opt="lookahead_adamw"), model)).__name__ == "Lookahead"
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.0, 0.05}
    with pytest.raises(UserError, match="unknown --opt 'adamww'"):
        create_optimizer(opt_args(opt="adamww"), model)
