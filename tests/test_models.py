"""Model zoo: exact shapes, parity with timm's ConvNeXt, arch round trips, channel groups."""
import json

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt as TimmConvNeXt

import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from common.errors import UserError

EFFICIENT_PARAMS = {
    "convnext_tiny_unpruned_cifar10": 27_827_818, "convnext_tiny_21M_pruned_cifar10": 21_303_850,
    "convnext_tiny_16M_pruned_cifar10": 16_549_354, "convnext_tiny_13M_pruned_cifar10": 13_564_330,
    "convnext_tiny_3M_pruned_cifar10": 3_181_098,
    "convnext_tiny_unpruned_tinyimagenet": 27_973_928,
    "convnext_tiny_21M_pruned_tinyimagenet": 21_413_480,
    "convnext_tiny_16M_pruned_tinyimagenet": 16_622_504,
    "convnext_tiny_13M_pruned_tinyimagenet": 13_601_000,
    "convnext_tiny_3M_pruned_tinyimagenet": 3_229_928,
    "convnext_tiny": 28_589_128,
}


def from_timm_state_dict(sd):
    """Rename a timm `ConvNeXt` state dict (conv_mlp=False) to the official key layout."""
    renames = [(".conv_dw.", ".dwconv."), (".mlp.fc1.", ".pwconv1."), (".mlp.fc2.", ".pwconv2."),
               ("head.norm.", "norm."), ("head.fc.", "head."), ("stem.0.", "downsample_layers.0.0."),
               ("stem.1.", "downsample_layers.0.1.")]
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        parts = key.split(".")
        if parts[0] == "stages" and parts[2] == "downsample":  # stages.s.downsample.i
            key = ".".join(["downsample_layers", parts[1]] + parts[3:])
        elif parts[0] == "stages" and parts[2] == "blocks":  # stages.s.blocks.j
            key = ".".join(parts[:2] + parts[3:])
        out[key] = value
    return out


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", EFFICIENT_PARAMS.items())
def test_exact_parameter_counts(name, expected):
    with torch.device("meta"):
        assert n_params(timm.create_model(name)) == expected


def test_every_kwarg_is_honoured():
    model = timm.create_model("convnext_tiny_13M_pruned_cifar10", num_classes=7, drop_path_rate=0.3,
                              pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None)
    assert model.head.out_features == 7
    assert model.stages[3][2].drop_path.drop_prob == pytest.approx(0.3)
    assert models.create_model("resnet18", num_classes=3, layer_scale_init_value=1e-6).fc.out_features == 3
    with pytest.raises(UserError, match="unknown model"):
        models.create_model("convnext_nonexistent")
    with pytest.raises(UserError, match="no pretrained weights"):  # ours without hub weights
        timm.create_model("convnext_tiny_13M_pruned_cifar10", pretrained=True)


@pytest.mark.e2e
def test_import_registers_quietly(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-W", "always", "-c", "import models"], capture_output=True,
                         text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0 and out.stderr == ""


@pytest.mark.parametrize("dims", [(16, 24, 32, 40), (96, 192, 384, 768)])
def test_logits_match_timm_convnext(dims):
    torch.manual_seed(0)
    depths = (1, 1, 2, 1)
    ref = TimmConvNeXt(depths=depths, dims=dims, num_classes=10, ls_init_value=0.5).eval()
    with torch.no_grad():  # random non-trivial norms and biases
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = models.build_model({"family": "convnext", "depths": list(depths), "dims": list(dims),
                               "num_classes": 10}).eval()
    ours.load_state_dict(from_timm_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4)


def _non_uniform_archs():
    conv = models.default_arch("convnext_tiny_3M_pruned_cifar10")
    conv = json.loads(json.dumps(conv))
    conv["hidden"] = [[7, 128, 3], [256, 9, 250], [1] * 9, [1024, 5, 17]]
    ms = json.loads(json.dumps(models.default_arch("convnext_ms_tiny_cifar10")))
    ms["depths"], ms["dims"] = [1, 2, 1, 1], [12, 20, 24, 16]
    ms["hidden"] = [[30], [50, 80], [7], [64]]
    ms["dw_branches"] = [[[2, 9, 1]], [[5, 15, 0], [5, 15, 0]], [[0, 24, 0]], [[4, 4, 8]]]
    iso = {"family": "convnext_isotropic", "depth": 3, "dim": 24, "hidden": [10, 96, 33],
           "layer_scale": True, "num_classes": 4, "in_chans": 3}
    return [conv, ms, iso]


@pytest.mark.parametrize("arch", _non_uniform_archs(), ids=["hidden", "multiscale", "isotropic"])
def test_arch_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    assert model.arch == arch
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, tmp_path / "c.pth")
    ckpt = load_checkpoint_file(tmp_path / "c.pth")
    rebuilt = models.build_model(ckpt["arch"]).eval()
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}
    assert models.infer_arch(ckpt["model"]) == arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_released_checkpoint_is_recognised(tmp_path):
    import argparse
    with torch.device("meta"):
        sd_shapes = timm.create_model("convnext_tiny_13M_pruned_cifar10").state_dict()
    sd = {k: torch.zeros(v.shape) for k, v in sd_shapes.items()}
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(model="x")}, tmp_path / "r.pth")
    arch = models.infer_arch(load_checkpoint_file(tmp_path / "r.pth")["model"])
    assert models.registered_name(arch) == "convnext_tiny_13M_pruned_cifar10"
    with pytest.raises(UserError, match=r"dims \[96, 192, 384, 192\].*convnext_tiny_13M_pruned_cifar10"):
        models.check_arch_matches(timm.create_model("convnext_tiny_unpruned_cifar10"), sd)
    with pytest.raises(UserError, match="not a layout this toolkit knows"):
        models.infer_arch({"fc.weight": torch.zeros(2, 2)})
    partial = {k: v for k, v in sd.items() if not k.startswith("stages.1.2.pwconv1")}
    with pytest.raises(UserError, match="weights are incomplete"):
        models.infer_arch(partial)


def _axes_cut(groups):
    cut = {}
    for g in groups:
        for part in g.slices:
            cut.setdefault((part.key, part.axis), []).append(
                (part.start, part.stop if part.stop is not None else g.width, g.name))
    return cut


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_ms_tiny", "convnext_isotropic_small"])
def test_channel_groups_cover_every_tensor_once_per_axis(name):
    arch = models.default_arch(name)
    with torch.device("meta"):
        sd = models.build_model(arch).state_dict()
    cut = _axes_cut(models.channel_groups(arch))
    for (key, axis), spans in cut.items():
        spans.sort()
        # the spans of one axis tile it exactly, no gap, no overlap (a multi-scale branch
        # holds a sub-range of its group's channels)
        assert spans[-1][1] - spans[0][0] == sd[key].shape[axis], key
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), key
        assert len({g for *_, g in spans}) == 1, f"{key} axis {axis} cut by several groups"
    stem = "stem.weight" if "stem.weight" in sd else "downsample_layers.0.0.weight"
    for key, tensor in sd.items():
        axes = {a for (k, a) in cut if k == key}
        # channel axes: out and in of dense weights; the image channels and classes stay
        want = {0, 1} if tensor.dim() >= 2 and tensor.shape[1] > 1 else {0}
        want = {"head.weight": {1}, "head.bias": set(), stem: {0}}.get(key, want)
        assert axes == want, (key, axes)
    for g in models.channel_groups(arch):
        for prod in g.producers:
            assert sum((p.stop or g.width) - p.start for p in prod.parts) == g.width, g.name
