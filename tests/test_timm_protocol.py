"""timm's model protocol on every name this project registers, in the spirit of timm's own model
tests (forward, backward with every parameter's gradient, default cfg consistency,
reset_classifier, feature_info against forward_intermediates, features_only), and the same
protocol on pruned shapes. Every registered name runs on the meta device (shapes, no memory);
each family's small example runs for real, where values are compared."""
import math

import pytest
import timm
import torch
from timm.models import group_parameters

import models
from common.errors import UserError
from pruning import KeepRules, PruneSpec, prune

NAMES = sorted(models.OUR_MODELS)


def meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_name_keeps_timms_protocol(name):
    model = meta(name, num_classes=42).train()
    cfg = model.default_cfg
    x = torch.randn(2, *cfg["input_size"], device="meta")
    out = model(x)
    assert tuple(out.shape) == (2, 42) and model.num_classes == 42
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    groups = group_parameters(model, model.group_matcher())
    assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())

    model.eval()
    features = model.forward_features(x)
    assert features.shape[1] == model.num_features and tuple(features.shape[-2:]) == cfg["pool_size"]
    final, maps = model.forward_intermediates(x)
    assert final.shape == features.shape and len(maps) == len(model.feature_info)
    for info, m in zip(model.feature_info, maps):
        assert m.shape[1] == info["num_chs"] and m.shape[-1] == math.ceil(cfg["input_size"][-1] / info["reduction"])
    assert tuple(model.forward_head(final, pre_logits=True).shape) == (2, model.head_hidden_size)
    model.reset_classifier(0)
    assert tuple(model(x).shape) == (2, model.num_features)
    model.reset_classifier(0, "")
    assert tuple(model(x).shape) == (2, model.num_features, *cfg["pool_size"])


def examples():
    return [pytest.param(family.example_arch(), id=name) for name, family in models.FAMILIES.items()
            if family.declared]


@pytest.mark.parametrize("arch", examples())
def test_the_protocol_computes_what_forward_computes(arch):
    """Real values on each family's small example: forward = forward_head(forward_features),
    forward_intermediates' final features are forward_features', grad checkpointing changes no
    gradient, global_pool '' runs the head at every position, a new head has the new classes."""
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    x = torch.randn(2, arch.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert torch.allclose(model.forward_head(features), logits, atol=1e-6)
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, features) and len(maps) == len(model.feature_info)
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert [m.shape for m in only] == [maps[0].shape, maps[-1].shape]
    model.train()
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(on)
        torch.manual_seed(1)  # the same drop-path / dropout draws
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    model.eval().set_grad_checkpointing(False)
    model.reset_classifier(5, "")
    with torch.no_grad():
        dense = model(x)
    assert dense.shape[:2] == (2, 5) and dense.dim() == 4
    model.reset_classifier(7, "avg")
    assert model(x).shape == (2, 7) and model.arch["num_classes"] == 7 and model.default_cfg["num_classes"] == 7


@pytest.mark.parametrize("arch", examples())
def test_torch_fx_traces_every_family_as_timms_feature_extractors_do(arch):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    traced = create_feature_extractor(model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
                                      tracer_kwargs=kwargs)
    x = torch.randn(2, arch.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        assert torch.equal(next(iter(traced(x).values())), model(x))
    headless = models.build_model({**arch, "num_classes": 0}, global_pool="")
    assert isinstance(headless.get_classifier(), torch.nn.Identity) and headless(x).shape[1] == headless.head_hidden_size


@pytest.mark.parametrize("arch", examples())
def test_features_only_through_timms_builder_gives_forward_intermediates(arch):
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    backbone = timm.create_model(models.ARCH_FACTORY, arch=arch, features_only=True).eval()
    backbone.model.load_state_dict({k: v for k, v in model.state_dict().items() if k in backbone.model.state_dict()})
    x = torch.randn(1, arch.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        maps = backbone(x)
        _, expected = model.forward_intermediates(x)
    assert backbone.feature_info.channels() == [i["num_chs"] for i in model.feature_info]
    assert [m.shape for m in maps] == [m.shape for m in expected]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, expected))
    picked = timm.create_model(models.ARCH_FACTORY, arch=arch, features_only=True, out_indices=(0,))
    assert len(picked.feature_info.channels()) == 1


def test_pruned_shapes_report_their_widths_as_features():
    """A pruned ConvNeXt (per-block MLP widths, narrower stages) and a pruned multi-scale one:
    feature_info and features_only give the pruned stage widths."""
    torch.manual_seed(0)
    base = {"family": "convnext", "depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], "num_classes": 10}
    for arch, dims in ((base, [8, 16, 24, 40]), ({**base, "dw": "multiscale"}, [12, 16, 32, 40])):
        source = models.build_model(arch).eval()
        result = prune(source, PruneSpec(rules=KeepRules(dims=dims), input_size=32))
        assert [i["num_chs"] for i in result.model.feature_info] == dims
        backbone = timm.create_model(models.ARCH_FACTORY, arch=result.model.arch, features_only=True).eval()
        with torch.no_grad():
            maps = backbone(torch.randn(1, 3, 64, 64))
        assert [m.shape[1] for m in maps] == dims == backbone.feature_info.channels()
        assert backbone.feature_info.reduction() == [4, 8, 16, 32]


def test_replaced_timm_names_keep_their_tags_and_options():
    """The names we replace keep what timm's class offers for them."""
    assert "convnext_tiny.fb_in22k" in timm.list_pretrained("convnext_tiny.*")
    tagged = meta("convnext_tiny.fb_in22k_ft_in1k_384")  # a tag's cfg, in our module names
    cfg = tagged.pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["first_conv"] == "downsample_layers.0.0" and cfg["classifier"] == "head"
    assert tuple(tagged.forward_features(torch.randn(1, *cfg["input_size"], device="meta")).shape[-2:]) == cfg["pool_size"]
    model = timm.create_model("convnext_tiny", global_pool="", num_classes=3)
    assert model.global_pool == "" and model.pretrained_cfg["classifier"] == "head"
    backbone = timm.create_model("convnext_tiny", features_only=True, out_indices=(1, 2))
    assert backbone.feature_info.channels() == [192, 384] and backbone.feature_info.reduction() == [8, 16]
    config = timm.data.resolve_model_data_config(timm.create_model("resnet56"))
    assert config["input_size"] == (3, 32, 32)
    with pytest.raises(UserError, match="resnet20: global_pool must be one of 'avg', 'max', 'avgmax', ''"):
        timm.create_model("resnet20", global_pool="token")
