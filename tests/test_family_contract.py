"""The family contract (models/family.py), checked over every registered family on its
example_arch: a new family registered in models/ is tested here with no other change."""
import copy

import pytest
import torch

import models
from checkpoints.io import save_checkpoint_file
from models.family import Family
from models.groups import part_stop
from pruning.surgery import prune_state_dict
from conftest import randomised

FAMILIES = sorted(n for n, f in models.FAMILIES.items() if f.declared)


def images(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=FAMILIES)
def family(request):
    cls = models.FAMILIES[request.param]
    return cls, randomised(cls.example_arch())


def test_every_family_keeps_the_contract(family):
    cls, model = family
    assert issubclass(cls, Family) and not getattr(cls, "__abstractmethods__", None)
    assert isinstance(model, cls) and model.arch["family"] in models.FAMILIES
    assert f"{cls.head_key}.weight" in model.state_dict()
    assert models.head_weight(model.state_dict()).shape[0] == model.arch["num_classes"]
    assert isinstance(cls.describe(model.arch), str) and cls.widths(model.arch)


def test_register_family_refuses_an_incomplete_class():
    class Half(torch.nn.Module, Family):
        @staticmethod
        def describe(arch):
            return "half"
    with pytest.raises(TypeError, match="does not implement .*channel_groups"):
        models.registry.register_family("half", Half)
    assert "half" not in models.FAMILIES


def test_arch_round_trip_and_inferred_arch(family):
    cls, model = family
    rebuilt = models.build_model(copy.deepcopy(model.arch))
    assert rebuilt.arch == model.arch
    assert models.infer_arch(model.state_dict()) == model.arch  # from the tensors alone
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_groups_cover_each_tensor_once_per_cut_axis(family):
    cls, model = family
    sd = model.state_dict()
    covered = {}
    for g in models.channel_groups(model.arch):
        assert g.kind in ("residual", "hidden", "conv") and isinstance(g.stage, int) and g.stage >= 0
        for part in g.slices:
            assert part.key in sd, f"{g.name} names {part.key}, which the model lacks"
            stop = part_stop(part, g.width)
            channels = covered.setdefault((part.key, part.axis), torch.zeros(sd[part.key].shape[part.axis]))
            channels[part.start - _offset(g, part):stop - _offset(g, part)] += 1
        for prod in g.producers:
            assert {p.key for p in prod.parts} <= {p.key for p in g.slices}
        assert set(g.scales) <= {p.key for p in g.slices}
    for (key, axis), count in covered.items():
        assert bool((count == 1).all()), f"{key} axis {axis} is cut {count.tolist()} times"


def _offset(group, part):
    """A branch tensor's channel 0 is the group's channel part.start (multi-scale parts)."""
    return part.start if part.start > 0 or part.stop is not None else 0


def test_keep_all_pruning_is_the_identity(family):
    _, model = family
    groups = models.channel_groups(model.arch)
    sd = model.state_dict()
    out = prune_state_dict(sd, groups, {g.name: torch.arange(g.width) for g in groups})
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_pruning_every_group_gives_a_model_of_the_inferred_shape(family):
    _, model = family
    groups = models.channel_groups(model.arch)
    keep = {g.name: torch.arange(0, g.width, 2) for g in groups}
    sd = prune_state_dict(model.state_dict(), groups, keep)
    small = models.build_model(models.infer_arch(sd)).eval()
    small.load_state_dict(sd, strict=True)
    assert small(images()).shape == (3, model.arch["num_classes"])


def test_fold_gives_the_same_logits(family):
    _, model = family
    with torch.no_grad():
        ref = model(images())
        out = models.fold(copy.deepcopy(model)).eval()(images())
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_layer_ids_cover_every_parameter_or_none(family):
    cls, model = family
    found = models.layer_ids(model)
    if found is not None:
        ids, num_layers = found
        assert set(ids) == {n for n, _ in model.named_parameters()}
        assert all(0 <= i <= num_layers + 1 for i in ids.values())


@pytest.mark.cli
def test_onnx_export_of_the_example(family, tmp_path, capsys):
    from cli import export
    _, model = family
    path = tmp_path / "model.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, path)
    assert export.main(["--checkpoint", str(path), "--output", str(tmp_path / "m.onnx"), "--input_size", "32",
                        "--parity_images", "4"]) is None
    assert "top-1 agreement 100.00%" in capsys.readouterr().out


def test_removing_blocks_equals_zeroing_their_branch(family):
    """Depth exactness on every family that declares removable blocks: each block's `gain`
    zeroed in the source gives the depth-pruned model's logits (to 1e-5 of the largest)."""
    from pruning import KeepRules, PruneSpec, prune
    from pruning.surgery import silence_blocks
    cls, model = family
    blocks = cls.removable_blocks(model.arch)
    for b in blocks:
        sd = model.state_dict()
        assert all(k in sd for k in (*b.gain, b.output, *(k for layer in b.branch for k in layer)))
        assert b.scale is None or b.scale in sd
    if not blocks:
        return
    result = prune(model, PruneSpec(criterion="l2", rules=KeepRules(remove_blocks=1), input_size=32))
    removed = [b["name"] for b in result.removed_blocks]
    assert len(removed) == 1 and removed[0] in {b.name for b in blocks}
    silenced = models.with_weights(model.arch, silence_blocks(model.state_dict(), blocks, removed))
    with torch.no_grad():
        ref, out = silenced(images()), result.model(images())
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))
    assert models.infer_arch(result.checkpoint["model"])["family"] == model.arch["family"]
    assert sum(cls.stage_depths(result.arch)) == sum(cls.stage_depths(model.arch)) - 1
