"""CIFAR ResNets and VGG-BN: exact sizes, arch round trips, channel groups, pruning, the CLI."""
import collections
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from common.errors import UserError
from cli.prune import main as prune_main
from pruning.plan import plan_keep
from pruning.spec import KeepRules
from pruning.criteria import Aggregation
from pruning.scoring import score_groups
from pruning.surgery import prune_state_dict
from helpers import ROOT

# the slimming seed's pruned VGG-19 at ratio 0.5 (its README's architecture table)
SEED_VGG_05 = [52, 64, "M", 128, 128, "M", 256, 254, 245, 214, "M", 179, 117, 116, 229, "M",
               228, 220, 210, 111]
PRUNED = {
    "resnet": {"family": "resnet_cifar", "depths": [2, 2, 2], "inner": [[5, 16], [32, 7], [1, 64]],
               "num_classes": 10, "in_chans": 3},
    "vgg": {"family": "vgg_cifar", "cfg": [8, "M", 5, 16, "M", 3], "num_classes": 7, "in_chans": 3},
}
SMALL = {"resnet": {"family": "resnet_cifar", "depths": [2, 2, 2], "inner": None, "num_classes": 10},
         "vgg": {"family": "vgg_cifar", "cfg": [8, 8, "M", 16, "M", 16, 12], "num_classes": 10}}


def randomised(arch, seed=0):
    """A model in eval mode whose BN statistics and affine weights are not the defaults."""
    torch.manual_seed(seed)
    model = models.build_model(arch).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.uniform_(-1, 1)
            m.running_var.data.uniform_(0.5, 2)
    return model


def logits(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(3, 3, 32, 32))


CIFAR_MODELS = {"resnet56": 853_018, "resnet110": 1_727_962, "preresnet110": 1_730_522,
                "wrn_28_10": 36_479_194, "wrn_28_10_dropout": 36_479_194, "vgg16_cifar": 14_987_722,
                "vgg16_bn_cifar": 14_724_042, "vgg19_bn_cifar": 20_035_018}


def n_params(name, **kwargs):
    with torch.device("meta"):
        model = models.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("name", list(CIFAR_MODELS))
def test_exact_parameter_counts_and_cifar100_heads(name):
    params, model = n_params(name)
    assert params == CIFAR_MODELS[name]
    params_100, model_100 = n_params(name, num_classes=100)
    features = model.get_classifier().in_features
    assert params_100 - params == 90 * (features + 1) and model_100.get_classifier().out_features == 100


def test_every_cifar_model_is_covered_above():
    cifar = {n for n, (cls, _) in models.OUR_MODELS.items() if cls.__module__.endswith("_cifar")}
    assert cifar - set(CIFAR_MODELS) <= {f"resnet{6 * n + 2}" for n in (3, 5, 7)} | {"vgg11_bn_cifar", "vgg13_bn_cifar"}


@pytest.mark.parametrize("name, family", [("resnet20", "resnet_cifar"), ("preresnet110", "preresnet_cifar"),
                                          ("wrn_28_10", "wrn_cifar"), ("vgg16_cifar", "vgg_cifar")])
def test_weights_alone_name_the_family(name, family):
    with torch.device("meta"):
        model = models.create_model(name)
    arch = models.infer_arch(model.state_dict())
    assert arch["family"] == family and arch == {k: v for k, v in model.arch.items() if k != "dropout"}


def test_wide_resnet_uses_the_reference_layout_and_activated_shortcuts():
    torch.manual_seed(0)
    model = models.build_model({"family": "wrn_cifar", "depths": [1, 1, 1], "widen": 2, "inner": None,
                                "num_classes": 10}).eval()
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.0.bn2.running_var", "bn1.weight"} <= set(model.state_dict())
    block, x = model.block2.layer[0], torch.randn(2, 32, 8, 8)
    act = torch.relu(block.bn1(x))
    hand = block.conv2(torch.relu(block.bn2(block.conv1(act)))) + block.convShortcut(act)
    assert torch.allclose(block(x), hand, atol=1e-6)


@pytest.mark.cli
def test_wide_resnet_dropout_survives_pruning_and_is_off_in_eval(tmp_path, capsys):
    arch = {"family": "wrn_cifar", "depths": [1, 1, 1], "widen": 1, "inner": None, "dropout": 0.3,
            "num_classes": 10, "in_chans": 3}
    model = randomised(arch)
    src, out = tmp_path / "wrn.pth", tmp_path / "wrn_pruned.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, src)
    assert prune_main(["--checkpoint", str(src), "--output", str(out), "--criterion", "l1",
                       "--ratio", "0.25"]) == 0
    pruned = load_checkpoint_file(out)["arch"]
    assert pruned["dropout"] == 0.3 and pruned["inner"] != [[16], [32], [64]]
    rebuilt = models.build_model(pruned)
    assert rebuilt.block1.layer[0].dropout == 0.3
    rebuilt.eval()
    assert torch.equal(logits(rebuilt), logits(rebuilt))


def test_preresnet_groups_leave_the_pre_activation_bn_whole():
    arch = models.default_arch("preresnet110")
    cut = {p.key for g in models.channel_groups(arch) for p in g.slices}
    assert "layer2.0.bn2.weight" in cut and "layer2.0.conv1.weight" in cut
    assert not any(".bn1." in k or "downsample" in k or k.startswith("bn.") for k in cut)


def test_seed_pruned_vgg_configuration_builds():
    model = models.build_model({"family": "vgg_cifar", "cfg": SEED_VGG_05, "num_classes": 10})
    assert sum(p.numel() for p in model.parameters()) == 4_612_633
    assert logits(model.eval()).shape == (3, 10)


@pytest.mark.parametrize("family", list(PRUNED))
def test_arch_round_trip_of_a_pruned_shape(family):
    model = models.build_model(PRUNED[family])
    sd = model.state_dict()
    assert models.infer_arch(sd) == model.arch == PRUNED[family]
    models.build_model(models.infer_arch(sd)).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("family", list(SMALL))
def test_groups_cut_every_tensor_once_per_axis(family):
    model = models.build_model(SMALL[family])
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    cuts = collections.Counter((p.key, p.axis) for g in groups for p in g.slices)
    assert max(cuts.values()) == 1 and all(k in sd for k, _ in cuts)
    for g in groups:
        for p in g.slices:
            assert sd[p.key].shape[p.axis] == g.width
    cut_keys = {k for k, _ in cuts}
    if family == "vgg":   # every conv and BN tensor; the first conv's input and the logits stay
        expected = {k for k in sd if not k.endswith("num_batches_tracked") and k != "classifier.bias"}
    else:                 # each block's conv1, bn1 and conv2: the residual streams stay whole
        expected = {k for k in sd if ".conv1." in k or (".bn1." in k and "num_batches" not in k)
                    or ".conv2." in k}
    assert cut_keys == expected


@pytest.mark.parametrize("family", list(SMALL))
def test_keep_all_is_the_identity(family):
    model = randomised(SMALL[family])
    groups = models.channel_groups(model.arch)
    out = prune_state_dict(model.state_dict(), groups, {g.name: torch.arange(g.width) for g in groups})
    rebuilt = models.build_model(models.infer_arch(out)).eval()
    rebuilt.load_state_dict(out)
    assert torch.equal(logits(rebuilt), logits(model))


@pytest.mark.parametrize("family", list(SMALL))
def test_pruning_channels_that_carry_nothing_keeps_the_logits(family):
    model = randomised(SMALL[family])
    groups = models.channel_groups(model.arch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keep = {}
    for g in groups:  # zero the odd channels: conv rows, BN weight and bias
        dead = torch.arange(1, g.width, 2)
        for p in g.slices:
            if p.axis == 0 and not p.key.endswith(("running_mean", "running_var")):
                sd[p.key].index_fill_(0, dead, 0.0)
        keep[g.name] = torch.arange(0, g.width, 2)
    model.load_state_dict(sd)
    out = prune_state_dict(sd, groups, keep)
    rebuilt = models.build_model(models.infer_arch(out)).eval()
    rebuilt.load_state_dict(out)
    assert sum(v.numel() for v in out.values()) < sum(v.numel() for v in sd.values())
    assert torch.allclose(logits(rebuilt), logits(model), atol=1e-5)


def test_slimming_threshold_equals_an_independent_percentile():
    model = randomised(models.default_arch("vgg19_bn_cifar"), seed=3)
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    keep = plan_keep(groups, score_groups(sd, groups, "slimming", aggregation=Aggregation(normalize="none")), KeepRules(ratio=0.7))
    # the seed: every |BN weight| in one list, threshold at the 70% position, keep those above
    scales = [sd[f"feature.{i}.weight"].abs().numpy() for i in _bn_indices(model.arch["cfg"])]
    flat = np.sort(np.concatenate(scales))
    threshold = flat[int(len(flat) * 0.7)]
    expected = [max(int((s > threshold).sum()), 1) for s in scales]
    assert [len(keep[g.name]) for g in groups] == expected


def _bn_indices(cfg):
    out, i = [], 0
    for v in cfg:
        if v == "M":
            i += 1
        else:
            out.append(i + 1)
            i += 3
    return out


def test_group_ratio_patterns_later_wins_and_zero_skips():
    model = models.create_model("resnet56")
    sd, groups = model.state_dict(), models.channel_groups(model.arch)
    ratios = [("layer1.*", 0.1), ("layer2.*", 0.2), ("layer3.*", 0.3), ("layer1.7", 0),
              ("layer2.0", 0), ("layer3.0", 0), ("layer3.8", 0)]
    keep = plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(group_ratio=ratios))
    widths = {g.name: len(keep[g.name]) for g in groups}
    assert widths["layer1.0"] == 14 and widths["layer2.1"] == 25 and widths["layer3.4"] == 44
    assert widths["layer1.7"] == 16 and widths["layer2.0"] == 32 and widths["layer3.8"] == 64
    with pytest.raises(UserError, match="matches no group"):
        plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(group_ratio=[("stages.*", 0.5)]))
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        plan_keep(groups, score_groups(sd, groups, "l1"), KeepRules(group_ratio=[("layer1.*", 1.0)]))


def test_vgg16_seed_recipe_names():
    model = models.create_model("vgg16_bn_cifar")
    groups = models.channel_groups(model.arch)
    names = [g.name for g in groups]
    assert names[:3] == ["conv1_1", "conv1_2", "conv2_1"] and names[-1] == "conv5_3"
    rules = KeepRules(group_ratio=[("conv1_1", 0.25), ("conv4_*", 0.25), ("conv5_*", 0.25)])
    keep = plan_keep(groups, score_groups(model.state_dict(), groups, "l1"), rules)
    assert [len(keep[n]) for n in ("conv1_1", "conv1_2", "conv4_1", "conv5_3")] == [48, 64, 384, 384]


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("r20") / "out"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", "resnet20", "--data_set", "DIGITS",
           "--input_size", "32", "--epochs", "1", "--batch_size", "64", "--opt", "sgd", "--lr", "0.05",
           "--weight_decay", "1e-4", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0",
           "--reprob", "0", "--aa", "none", "--smoothing", "0", "--num_workers", "0",
           "--device", "cpu", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "checkpoint-0.pth"


@pytest.mark.e2e
def test_cli_end_to_end_resnet(trained_resnet, tmp_path, capsys):
    out = tmp_path / "r20.pth"
    assert prune_main(["--checkpoint", str(trained_resnet), "--list_groups"]) == 0
    assert "layer3.2" in capsys.readouterr().out
    assert prune_main(["--checkpoint", str(trained_resnet), "--output", str(out), "--criterion", "l1",
                       "--group_ratio", "layer*=0.5", "layer3.2=0"]) == 0
    ckpt = load_checkpoint_file(out)
    assert ckpt["arch"]["inner"] == [[8, 8, 8], [16, 16, 16], [32, 32, 64]]
    assert ckpt["pruning"]["options"]["group_ratio"] == [["layer*", 0.5], ["layer3.2", 0.0]]
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--eval", "true", "--resume", str(out),
                           "--data_set", "DIGITS", "--num_workers", "0", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "* Acc@1" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.cli
def test_cli_end_to_end_vgg_slimming(tmp_path, capsys):
    model = randomised(SMALL["vgg"])
    src = tmp_path / "vgg.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"input_size": 32}}, src)
    out = tmp_path / "slim.pth"
    assert prune_main(["--checkpoint", str(src), "--output", str(out), "--criterion", "slimming",
                       "--ratio", "0.5", "--normalize", "none"]) == 0
    arch = load_checkpoint_file(out)["arch"]
    assert sum(v for v in arch["cfg"] if v != "M") <= 30 and "MACs @32px" in capsys.readouterr().out
    assert prune_main(["--checkpoint", str(src), "--output", str(out), "--dims", "4", "--overwrite"]) == 2
    assert "no residual channel groups" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sparsity training

def test_l1_subgradient_is_added_once_per_step_to_unscaled_gradients():
    import engine
    import utils
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    add = engine.l1_subgradient([w], 0.1)
    assert scaler((w * 0).sum(), opt, update_grad=False, before_step=add) is None   # accumulation
    scaler((w * 0).sum(), opt, update_grad=True, before_step=add)
    assert torch.allclose(w.detach(), torch.tensor([0.4, -1.9, 0.0]))


def _train_resnet(out, *extra, launcher=()):
    cmd = [sys.executable, *launcher, str(ROOT / "main.py"), "--model", "resnet20", "--data_set", "DIGITS",
           "--input_size", "32", "--epochs", "1", "--batch_size", "64", "--opt", "sgd", "--lr", "0.05",
           "--weight_decay", "0", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
           "--aa", "none", "--smoothing", "0", "--num_workers", "0", "--device", "cpu",
           "--disable_eval", "true", "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return __import__("json").loads((out / "log.txt").read_text().splitlines()[-1])


@pytest.mark.e2e
def test_sparsity_makes_the_scale_factors_shrink_faster(tmp_path):
    plain = _train_resnet(tmp_path / "plain")
    sparse = _train_resnet(tmp_path / "sparse", "--sparsity", "0.05")
    assert sparse["train_mean_abs_scale"] < plain["train_mean_abs_scale"] - 0.01, (plain, sparse)


@pytest.mark.e2e
def test_sparsity_under_two_gloo_processes(tmp_path):
    log = _train_resnet(tmp_path / "dist", "--sparsity", "0.01",
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert 0 < log["train_mean_abs_scale"] < 1


@pytest.mark.cli
def test_sparsity_needs_one_of_our_families(capsys):
    import main
    assert main.cli(["--model", "resnet18", "--sparsity", "1e-4", "--data_set", "DIGITS",
                     "--device", "cpu"]) == 2
    assert "--sparsity needs one of this toolkit's model families" in capsys.readouterr().err
