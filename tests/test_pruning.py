"""Group scoring, keep rules, cost model and surgery on small real models (CPU)."""
import pytest
import timm
import torch

import models
from models import count_arch
from pruning.costs import CostModel
from pruning.criteria import l1, opnorm
from pruning.criteria import Aggregation
from pruning.plan import fixed_widths, min_width, plan_keep, ranking, select
from pruning.scoring import score_group, score_groups
from pruning.spec import KeepRules
from pruning.surgery import new_arch, prune_checkpoint, prune_state_dict, read_source
from common.errors import UserError
from conftest import randomised

SMALL = {"family": "convnext", "depths": [1, 2, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 5}
MULTISCALE = {**SMALL, "dims": [12, 16, 24, 32], "dw": "multiscale",
              "dw_branches": [[[3, 6, 3]], [[4, 8, 4], [2, 10, 4]], [[6, 12, 6]] * 2, [[8, 16, 8]]]}
ISOTROPIC = {"family": "convnext_isotropic", "depth": 3, "dim": 16, "num_classes": 4,
             "layer_scale": True}


def logits(model, size=32, seed=1):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def rebuild(sd):
    """Build the shape a state dict holds and load it strictly."""
    model = models.build_model(models.infer_arch(sd)).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def small():
    model = randomised(SMALL)
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # not aliased to the model
    return model, sd, models.channel_groups(model.arch)


def test_keep_all_is_identity(small):
    model, sd, groups = small
    keep = {g.name: torch.arange(g.width) for g in groups}
    out = prune_state_dict(sd, groups, keep)
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)
    assert torch.equal(logits(rebuild(out)), logits(model))
    scores = score_groups(sd, groups, "opnorm")
    planned = plan_keep(groups, scores, KeepRules(dims=SMALL["dims"], hidden_ratio=[1.0]))
    assert all(torch.equal(planned[g.name], torch.arange(g.width)) for g in groups)


def test_removing_dead_hidden_channels_keeps_logits(small):
    _, sd, groups = small
    model = randomised(SMALL)
    sd = {k: v.clone() for k, v in sd.items()}
    dead = {}
    for g in groups:
        if g.kind == "hidden":
            block = g.name[:-len(".hidden")]
            rows = torch.arange(1, g.width, 3)  # every third channel contributes exactly zero
            sd[f"{block}.pwconv1.weight"][rows] = 0
            sd[f"{block}.pwconv1.bias"][rows] = 0
            sd[f"{block}.pwconv2.weight"][:, rows] = 0
            dead[g.name] = set(rows.tolist())
    model.load_state_dict(sd)
    before = logits(model)
    # l1 ranks the all-zero rows last, so keeping 2/3 removes exactly the dead channels
    keep = plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(hidden_ratio=[2 / 3]))
    for name, rows in dead.items():
        assert set(keep[name].tolist()).isdisjoint(rows)
    pruned = rebuild(prune_state_dict(sd, groups, keep))
    assert torch.allclose(logits(pruned), before, atol=1e-5)


def test_residual_bookkeeping(small):
    _, sd, groups = small
    keep = {g.name: torch.tensor([0, 2, 3, 7]) for g in groups if g.kind == "residual"}
    out = prune_state_dict(sd, groups, keep)
    model = rebuild(out)  # strict load: every cut tensor agrees with the new shape
    assert models.infer_arch(out)["dims"] == [4, 4, 4, 4]
    idx = keep["stages.1.residual"]
    assert torch.equal(out["stages.1.0.pwconv1.weight"], sd["stages.1.0.pwconv1.weight"][:, idx])
    assert torch.equal(out["stages.1.1.pwconv2.bias"], sd["stages.1.1.pwconv2.bias"][idx])
    assert torch.equal(out["stages.1.1.gamma"], sd["stages.1.1.gamma"][idx])
    assert torch.equal(out["downsample_layers.1.1.weight"],
                       sd["downsample_layers.1.1.weight"][idx][:, keep["stages.0.residual"]])
    assert torch.equal(out["head.weight"], sd["head.weight"][:, keep["stages.3.residual"]])
    assert torch.isfinite(logits(model)).all()


def test_layer_scale_folded_unless_raw(small):
    _, sd, groups = small
    g = next(g for g in groups if g.name == "stages.3.residual")
    w, gamma = sd["stages.3.0.pwconv2.weight"], sd["stages.3.0.gamma"]
    label = "stages.3.0.pwconv2.weight"
    folded = score_group(sd, g, "l1").sources[label]
    raw = score_group(sd, g, "l1", raw_weights=True).sources[label]
    expect = l1(w * gamma[:, None])
    assert torch.allclose(folded, expect / expect.max())
    assert torch.allclose(raw, l1(w) / l1(w).max())


def test_reductions(small):
    _, sd, groups = small
    g = next(g for g in groups if g.name == "stages.0.residual")
    producers = dict(scope="producers", normalize="max")
    per = torch.stack(list(score_group(sd, g, "opnorm", aggregation=Aggregation(**producers)).sources.values()))
    assert per.shape == (len(g.producers), g.width)
    assert torch.equal(per.max(dim=1).values, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(score_group(sd, g, "opnorm", aggregation=Aggregation(**producers, reduce="mean")).score,
                          per.mean(0))
    assert torch.allclose(score_group(sd, g, "opnorm", aggregation=Aggregation(**producers, reduce="sum")).score, per.sum(0))
    assert torch.allclose(score_group(sd, g, "opnorm", aggregation=Aggregation(**producers, reduce="max")).score, per.max(0).values)
    assert torch.allclose(score_group(sd, g, "opnorm", aggregation=Aggregation(**producers, reduce="first")).score, opnorm(
        sd["downsample_layers.0.0.weight"]))


def test_ties_keep_lower_index_and_sorted_output(small):
    _, _, groups = small
    g = next(g for g in groups if g.kind == "hidden")
    order = ranking(torch.zeros(g.width, dtype=torch.float64))
    assert select(g, order, 5).tolist() == [0, 1, 2, 3, 4]
    scores = torch.tensor([0.5, 1.0, 0.5, 1.0] + [0.0] * (g.width - 4), dtype=torch.float64)
    assert select(g, ranking(scores), 3).tolist() == [0, 1, 3]


def test_random_and_slimming(small):
    _, sd, groups = small
    a = plan_keep(groups, score_groups(sd, groups, "random", seed=3), KeepRules(hidden_ratio=[0.5]))
    b = plan_keep(groups, score_groups(sd, groups, "random", seed=3), KeepRules(hidden_ratio=[0.5]))
    c = plan_keep(groups, score_groups(sd, groups, "random", seed=4), KeepRules(hidden_ratio=[0.5]))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    per = score_group(sd, groups[-1], "random", seed=3).sources.values()
    assert all(torch.equal(p, next(iter(per))) for p in per)  # the mean of producers stays uniform
    slim = score_groups(sd, groups, "slimming")
    keep = plan_keep(groups, slim, KeepRules(dims=[4, 8, 12, 16]))
    assert rebuild(prune_state_dict(sd, groups, keep)).arch["dims"] == [4, 8, 12, 16]
    with pytest.raises(UserError, match="nothing to score"):
        plan_keep(groups, slim, KeepRules(hidden_ratio=[0.5]))


def test_keep_rule_errors(small):
    _, sd, groups = small
    scores = score_groups(sd, groups, "l1")
    for dims, msg in [([8, 16, 24], "takes 4 values"), ([8, 16, 24, 64], "only 32 channels"),
                      ([8, 0, 24, 32], "KeepRules.dims must be >= 1, got 0")]:
        with pytest.raises(UserError, match=msg):
            plan_keep(groups, scores, KeepRules(dims=dims))
    with pytest.raises(UserError, match="1 or 4 values"):
        plan_keep(groups, scores, KeepRules(hidden_ratio=[0.5, 0.5]))
    with pytest.raises(UserError, match="cannot keep"):
        plan_keep(groups, scores, KeepRules(mlp_ratio=[8]))
    with pytest.raises(UserError, match="cannot be met"):
        plan_keep(groups, scores, KeepRules(target_params=100),
                  cost_model=CostModel(small[0].arch, groups, 32))


def test_round_to_and_min_one_channel(small):
    _, sd, groups = small
    widths = fixed_widths(groups, KeepRules(hidden_ratio=[0.3], round_to=8))
    assert all(w % 8 == 0 or w == g.width for g in groups for w in [widths.get(g.name, 8)])
    widths = fixed_widths(groups, KeepRules(hidden_ratio=[0.001]))
    assert set(widths.values()) == {1}


def check_cost_model(arch, keep_fn, size=64):
    model = randomised(arch)
    groups = models.channel_groups(model.arch)
    cost = CostModel(model.arch, groups, size)
    keep = {g.name: keep_fn(g) for g in groups}
    sd = prune_state_dict(model.state_dict(), groups, keep)
    assert cost(keep) == count_arch(models.infer_arch(sd), size)


@pytest.mark.parametrize("arch", [SMALL, MULTISCALE, ISOTROPIC], ids=["convnext", "multiscale", "isotropic"])
def test_cost_model_matches_flop_counter(arch):
    check_cost_model(arch, lambda g: select(g, torch.randperm(g.width, generator=torch.Generator()
                                                                  .manual_seed(g.width)), g.width // 2))


def test_global_targets(small):
    _, sd, groups = small
    cost = CostModel(small[0].arch, groups, 32)
    scores = score_groups(sd, groups, "opnorm")
    full_params, full_macs = cost({})
    keep = plan_keep(groups, scores, KeepRules(target_params=full_params // 2), cost_model=cost)
    params, _ = cost(keep)
    assert params <= full_params // 2
    assert params > full_params // 2 - 2000  # stops close to the target, not far below
    keep = plan_keep(groups, scores, KeepRules(target_macs=full_macs // 3, round_to=4), cost_model=cost)
    assert cost(keep)[1] <= full_macs // 3
    assert all(len(k) % 4 == 0 or len(k) == g.width for g, k in zip(groups, keep.values()))
    keep = plan_keep(groups, scores, KeepRules(dims=[4, 8, 12, 16], ratio=0.5))
    hidden = [g for g in groups if g.kind == "hidden"]
    assert sum(len(keep[g.name]) for g in hidden) <= 0.5 * sum(g.width for g in hidden)
    assert [len(keep[f"stages.{s}.residual"]) for s in range(4)] == [4, 8, 12, 16]
    with pytest.raises(UserError, match="fix every group"):
        plan_keep(groups, scores, KeepRules(dims=[4, 8, 12, 16], hidden_ratio=[1], ratio=0.5))


@pytest.fixture(scope="module")
def tiny_cifar():
    torch.manual_seed(0)
    model = models.create_model("convnext_tiny_unpruned_cifar10")  # random init, full size
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    return sd, groups, score_groups(sd, groups, "opnorm")


@pytest.mark.parametrize("variant,dims,params", [
    ("convnext_tiny_21M_pruned_cifar10", [96, 192, 384, 576], 21_303_850),
    ("convnext_tiny_16M_pruned_cifar10", [96, 192, 384, 384], 16_549_354),
    ("convnext_tiny_13M_pruned_cifar10", [96, 192, 384, 192], 13_564_330),
    ("convnext_tiny_3M_pruned_cifar10", [32, 64, 128, 256], 3_181_098),
])
@pytest.mark.parametrize("mlp_rule", [{}, {"mlp_ratio": [4]}], ids=["dims alone", "mlp_ratio 4"])
def test_efficient_convnext_variants(tiny_cifar, variant, dims, params, mlp_rule):
    sd, groups, scores = tiny_cifar
    keep = plan_keep(groups, scores, KeepRules(dims=dims, **mlp_rule))  # --dims alone: MLPs stay 4x
    out = prune_state_dict(sd, groups, keep)
    assert sum(v.numel() for v in out.values()) == params
    model = timm.create_model(variant)
    model.load_state_dict(out, strict=True)
    assert models.registered_name(models.infer_arch(out)) == variant


def test_hidden_ratio_1_keeps_every_mlp_whole(tiny_cifar):
    sd, groups, scores = tiny_cifar
    keep = plan_keep(groups, scores, KeepRules(dims=[32, 64, 128, 256], hidden_ratio=[1]))
    assert all(len(keep[g.name]) == g.width for g in groups if g.kind == "hidden")


def test_hidden_ratio_per_stage_gives_13m(tiny_cifar):
    sd, groups, scores = tiny_cifar
    keep = plan_keep(groups, scores, KeepRules(dims=[96, 192, 384, 192], hidden_ratio=[1, 1, 1, 0.25]))
    assert sum(v.numel() for v in prune_state_dict(sd, groups, keep).values()) == 13_564_330


def test_multiscale_branches_stay_in_their_branch():
    model = randomised(MULTISCALE)
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    keep = plan_keep(groups, score_groups(sd, groups, "opnorm"), KeepRules(dims=[5, 7, 9, 3], hidden_ratio=[0.5]))
    out = prune_state_dict(sd, groups, keep)
    arch = models.infer_arch(out)
    for s, stage in enumerate(MULTISCALE["dw_branches"]):
        idx = keep[f"stages.{s}.residual"]
        for j, widths in enumerate(stage):
            start = 0
            for name, width, new in zip(("local", "mid", "wide"), widths, arch["dw_branches"][s][j]):
                mine = idx[(idx >= start) & (idx < start + width)] - start
                assert new == len(mine) >= 1  # every branch keeps >= 1 channel
                key = f"stages.{s}.{j}.dwconv.{name}.weight"
                assert torch.equal(out[key], sd[key][mine])  # its own channels, nothing moved
                start += width
    assert arch["dw_branches"][3][0] == [1, 1, 1]  # 3 channels over 3 branches: one each
    assert torch.isfinite(logits(rebuild(out))).all()
    assert min_width(groups[-1]) == 3
    with pytest.raises(UserError, match="multi-scale branch"):
        plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(dims=[5, 7, 9, 2]))


def test_isotropic():
    model = randomised(ISOTROPIC)
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    keep = plan_keep(groups, score_groups(sd, groups, "fpgm"), KeepRules(dims=[10], hidden_ratio=[0.5]))
    out = prune_state_dict(sd, groups, keep)
    pruned = rebuild(out)
    assert pruned.arch["dim"] == 10 and pruned.arch["hidden"] == [32, 32, 32]
    assert torch.isfinite(logits(pruned)).all()
    with pytest.raises(UserError, match="takes 1 values"):
        plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(dims=[8, 8]))


def test_checkpoint_surgery_with_ema(small):
    model, sd, groups = small
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
    ckpt = {"model": sd, "model_ema": ema, "optimizer": {"state": {}}, "scaler": {}, "epoch": 4,
            "args": {"lr": 1e-3}, "arch": model.arch, "max_accuracy": 61.5}
    sds, scored, arch = read_source(ckpt, use_ema=True)
    assert scored == "model_ema" and arch == model.arch
    scores = score_groups(sds[scored], groups, "l2")
    plain = score_groups(sd, groups, "l2")
    assert not torch.equal(scores["stages.0.residual"].score, plain["stages.0.residual"].score)
    keep = plan_keep(groups, scores, KeepRules(dims=[4, 8, 8, 8], hidden_ratio=[0.5]))
    out = prune_checkpoint(ckpt, sds, groups, keep, arch, {"criterion": "l2"})
    assert set(out) == {"model", "model_ema", "args", "arch", "pruning"}
    assert out["arch"] == models.infer_arch(out["model"]) == models.infer_arch(out["model_ema"])
    assert out["pruning"]["source_max_accuracy"] == 61.5
    assert out["pruning"]["kept"]["stages.0.residual"] == keep["stages.0.residual"].tolist()
    idx = keep["stages.2.residual"]
    assert torch.equal(out["model_ema"]["stages.2.0.norm.weight"], ema["stages.2.0.norm.weight"][idx])
    assert new_arch(arch, out["model"])["dims"] == [4, 8, 8, 8]


def test_read_source_released_format(small):
    import argparse
    model, sd, _ = small
    ckpt = {"model": sd, "args": argparse.Namespace(model="x")}
    _, _, arch = read_source(ckpt)
    assert arch == models.infer_arch(sd)
    with pytest.raises(UserError, match="no model_ema"):
        read_source(ckpt, use_ema=True)
    with pytest.raises(UserError):
        read_source(ckpt, model_name="convnext_tiny_13M_pruned_cifar10")  # another shape
    with pytest.raises(UserError, match="the weights do not fit timm resnet18: missing conv1.weight"):
        read_source(ckpt, model_name="resnet18")  # a stock timm name is traced: its weights must fit
