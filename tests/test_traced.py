"""The traced family: channel groups of any model read off a recorded forward (models/graph.py),
the files it writes rebuilt without code (models/traced.py, pruning.load)."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import models
import pruning
from common.errors import UserError
from conftest import randomised
from helpers import ROOT
from models import traced
from models.groups import part_span, part_stop
from pruning import KeepRules, PruneSpec, prune
from pruning.surgery import prune_state_dict, silence

DECLARED = sorted(n for n, f in models.FAMILIES.items() if f.declared)
# Groups the trace finds that a declared family chose not to declare (the seed papers' choices):
# PreResNet's and WRN's residual streams, VGG's hidden Linear. Any other difference fails.
NOT_DECLARED = {"preresnet_cifar": {"conv1", "layer2.0.conv2", "layer3.0.conv2"},
                "wrn_cifar": {"conv1", "block2.layer.0.conv2", "block3.layer.0.conv2"},
                "vgg_cifar": {"hidden.0"}}


def torchvision_model(name, **kwargs):
    import torchvision
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():  # statistics and affines away from their init: a check that can fail
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def slices(groups):
    """Each group as the set of tensor slices it cuts: what 'the same groups' means."""
    return {frozenset((p.key, p.axis, p.start, part_stop(p, g.width), p.offset, p.block) for p in g.slices): g.name
            for g in groups}


def plain_convnext():
    arch = dict(models.FAMILIES["convnext"].example_arch())
    arch.pop("dw_branches")
    arch["dw"] = "standard"
    return arch


@pytest.mark.parametrize("name", DECLARED + ["convnext_plain"])
def test_traced_groups_equal_the_declared_ones(name):
    arch = plain_convnext() if name == "convnext_plain" else models.FAMILIES[name].example_arch()
    model = randomised(arch)
    declared = slices(models.channel_groups(model.arch))
    found = slices(models.channel_groups(traced.arch_of_model(model, 32)))
    if name == "convnext":  # multi-scale: the branches' split channels stay whole when traced
        whole = traced.analysis(traced.arch_of_model(model, 32)).whole
        assert all("slice" in whole[n] for n in ("stages.0.0.dwconv.local", "stages.1.1.dwconv.wide"))
        assert set(found) < set(declared)
        return
    assert set(declared) <= set(found), "a declared group the trace does not find"
    assert {found[k] for k in set(found) - set(declared)} == NOT_DECLARED.get(name, set())
    by_name = {g.name: g for g in models.channel_groups(traced.arch_of_model(model, 32))}
    for g in models.channel_groups(model.arch):  # and each scores the same rows and scale factors
        twin = by_name[found[next(k for k, n in declared.items() if n == g.name)]]
        assert {(tuple(p.key for p in q.parts), q.scale) for q in g.producers} == {
            (tuple(p.key for p in q.parts), q.scale) for q in twin.producers}, g.name
        assert set(g.scales) == set(twin.scales), g.name


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121"])
def test_pruning_equals_silencing_the_cut_channels(name):
    """Exactness through BatchNorm networks: the source with the cut channels' rows, biases and
    norm affines zeroed gives the pruned model's logits."""
    model = torchvision_model(name, num_classes=10)
    result = prune(model, PruneSpec(criterion="l1", rules=KeepRules(ratio=0.5), input_size=32))
    src = result.source
    assert result.checkpoint["arch"]["builder"] == {"kind": "torchvision", "name": name}
    dead = models.with_weights(src.arch, silence(src.sds["model"], src.groups, result.keep))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out, dense = dead(x), result.model(x), model(x)
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((dense - ref).abs().max()) > 1e-3  # the cut changed the dense model's logits
    assert sum(g.width for g in models.channel_groups(result.arch)) < sum(g.width for g in src.groups)


class VGG11BNNarrow(nn.Module):
    """torchvision's VGG-11-BN features with a narrow classifier (the 25088 x 4096 Linear would
    hold 0.4 GB): a flatten before a Linear, so each channel owns 7 x 7 columns."""

    def __init__(self, classes=10):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        self.features = make_layers(cfgs["A"], batch_norm=True)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def test_vgg11_bn_flatten_blocks_prune_exactly():
    torch.manual_seed(0)
    model = VGG11BNNarrow().eval()
    result = prune(model, PruneSpec(criterion="l1", rules=KeepRules(ratio=0.5), input_size=32))
    last = next(g for g in result.source.groups if any(p.key == "classifier.0.weight" for p in g.slices))
    assert next(p for p in last.slices if p.key == "classifier.0.weight").block == 49
    src = result.source
    dead = models.with_weights(src.arch, silence(src.sds["model"], src.groups, result.keep))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dead(x), result.model(x), atol=1e-5)
    assert result.model.classifier[0].in_features == len(result.keep[last.name]) * 49


def test_densenet_concatenations_cut_consumers_at_offsets():
    model = torchvision_model("densenet121", num_classes=10)
    groups = models.channel_groups(traced.arch_of_model(model, 32))
    parts = [p for g in groups for p in g.slices if p.key == "features.denseblock1.denselayer3.norm1.weight"]
    assert sorted(p.offset for p in parts) == [0, 64, 96]  # the stem's 64, then each layer's 32
    sd = model.state_dict()
    covered = {}
    for g in groups:  # every position of every cut axis belongs to at most one group
        for p in g.slices:
            seen = covered.setdefault((p.key, p.axis), torch.zeros(sd[p.key].shape[p.axis]))
            seen[p.offset:part_span(p, g.width)] += 1
    assert all(bool((c <= 1).all()) for c in covered.values())
    keep_all = {g.name: torch.arange(g.width) for g in groups}
    assert all(torch.equal(a, sd[k]) for k, a in prune_state_dict(sd, groups, keep_all).items())


class AudioCNN(nn.Module):
    """A small audio CNN of the PANNs kind: BatchNorm over the mel bins (kept whole: they are
    the input's), conv blocks, mean over mel, max + mean over time."""

    def __init__(self, classes=5):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                                                    nn.ReLU(), nn.AvgPool2d(2)) for i, o in ((1, 16), (16, 32))])
        self.fc1 = nn.Linear(32, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.blocks(x).mean(dim=3)
        return self.fc(torch.relu(self.fc1(x.max(dim=2).values + x.mean(dim=2))))


def test_a_model_of_your_own_class_saves_and_loads_with_an_instance(tmp_path):
    torch.manual_seed(0)
    model = AudioCNN().eval()
    result = prune(model, PruneSpec(criterion="opnorm", rules=KeepRules(ratio=0.5), input_size=16))
    assert result.arch["builder"]["kind"] == "module"
    assert "bn0" not in {p.key.rsplit(".", 1)[0] for g in result.source.groups for p in g.slices}
    x = torch.randn(2, 1, 16, 16)
    for name in ("p.pth", "p.safetensors"):
        result.save(tmp_path / name)
        with pytest.raises(UserError, match="of your own: pass model="):
            pruning.load(tmp_path / name)
        back = pruning.load(tmp_path / name, model=AudioCNN())
        with torch.no_grad():
            assert torch.equal(back(x), result.model(x))
    with pytest.raises(UserError, match="the model given is a"):
        pruning.load(tmp_path / "p.pth", model=nn.Linear(2, 2))
    assert torch.load(tmp_path / "p.pth", weights_only=True)["arch"]["family"] == "traced"  # no pickled code


def test_timm_and_torchvision_files_rebuild_from_the_file_alone(tmp_path):
    import timm
    torch.manual_seed(0)
    for model in (timm.create_model("mobilenetv3_small_050", num_classes=7).eval(),
                  torchvision_model("squeezenet1_1", num_classes=7)):
        result = prune(model, PruneSpec(criterion="l2", rules=KeepRules(ratio=0.5), input_size=32))
        result.save(tmp_path / "m.safetensors", overwrite=True)
        back = pruning.load(tmp_path / "m.safetensors")
        assert type(back) is type(model)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(back(x), result.model(x))
        again = prune(back, PruneSpec(criterion="l2", rules=KeepRules(ratio=0.5), input_size=32))  # pruned again
        assert again.arch["builder"] == result.arch["builder"]
        assert sum(g.width for g in again.source.groups) > sum(g.width for g in models.channel_groups(again.arch))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3, groups=2)
        self.c = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


class FixedView(nn.Module):
    """A size written into the code: x.view(n, 16, -1) stays 16 whatever the conv makes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], 16, -1).mean(-1))


class FixedInside(nn.Module):
    """The size is fixed inside a submodule: the groups writing into it stay whole, the rest is cut."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), FixedView()
        self.head.conv = nn.Identity()

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def test_what_the_trace_cannot_prove_safe_stays_whole_or_is_refused():
    result = prune(FixedInside().eval(), PruneSpec(rules=KeepRules(ratio=0.5), input_size=16))
    assert "kept whole after a cut failed" in result.kept_whole["b"] and result.model.a.out_channels < 8
    assert result.model.b.out_channels == 16 and result.checkpoint["pruning"]["kept_whole"].keys() == {"b"}
    found = prune(Grouped().eval(), PruneSpec(rules=KeepRules(ratio=0.5), input_size=16)).source
    assert "grouped conv (groups=2)" in found.kept_whole["a"] and [g.name for g in found.groups] == ["c"]
    with pytest.raises(UserError, match="size fixed in its code"):
        prune(FixedView().eval(), PruneSpec(rules=KeepRules(ratio=0.5), input_size=16))

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("no")
    with pytest.raises(UserError, match=r"Sequential does not run on a 3 x 16 x 16 input \(in 1 \(Broken\)\): ValueError: no"):
        prune(nn.Sequential(nn.Conv2d(3, 4, 1), Broken()), PruneSpec(rules=KeepRules(ratio=0.5), input_size=16))
    with pytest.raises(UserError, match="--dims / --mlp_ratio need one residual stream per stage"):
        prune(torchvision_model("resnet18"), PruneSpec(rules=KeepRules(dims=[8, 16, 32, 64]), input_size=32))


def test_forcing_the_trace_on_a_declared_family_gives_the_same_pruning():
    model = randomised(plain_convnext())
    spec = PruneSpec(criterion="opnorm", rules=KeepRules(ratio=0.5), input_size=32)
    declared, found = prune(model, spec), prune(model, PruneSpec(**{**spec.__dict__, "trace": True}))
    assert found.arch["builder"]["kind"] == "arch"
    assert {slices_key: len(declared.keep[name]) for slices_key, name in slices(declared.source.groups).items()} == {
        k: len(found.keep[n]) for k, n in slices(found.source.groups).items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(declared.model(x), found.model(x), atol=1e-6)


@pytest.mark.e2e
def test_prune_finetune_evaluate_and_export_a_torchvision_checkpoint_from_the_command_line(tmp_path):
    torch.save(torchvision_model("resnet18", num_classes=7).state_dict(), tmp_path / "r18.pth")

    def run(*argv):
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr
    text = run("pruning/prune.py", "--checkpoint", str(tmp_path / "r18.pth"), "--model", "torchvision:resnet18",
               "--ratio", "0.5", "--input_size", "32", "--output", str(tmp_path / "p.safetensors"))
    assert "torchvision resnet18 (traced" in text and "traced groups" in text
    text = run("main.py", "--finetune", str(tmp_path / "p.safetensors"), "--data_set", "DIGITS", "--input_size",
               "32", "--batch_size", "128", "--epochs", "1", "--num_workers", "0", "--output_dir", str(tmp_path / "ft"))
    assert "traced, 102 tensors resized), 10 classes" in text  # a fresh 10-class head on the 7-class file
    best = str(tmp_path / "ft" / "checkpoint-best.pth")
    text = run("main.py", "--eval", "true", "--resume", best, "--data_set", "DIGITS", "--batch_size", "128")
    assert "Accuracy of the network on the 360 test images" in text
    text = run("scripts/export.py", "--checkpoint", best, "--output", str(tmp_path / "p.onnx"), "--parity_images", "4")
    assert "top-1 agreement 100.00%" in text
    back = pruning.load(best)
    assert back.fc.out_features == 10 and back.layer1[0].conv1.out_channels < 64
