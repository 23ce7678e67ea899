"""The pruning library API (pruning.prune and its typed spec), criteria as objects, and the
options each criterion reads: the same results as prune.py, refusals instead of dropped flags."""
import json
import re

import pytest
import torch
from PIL import Image

import models
import pruning
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from common.errors import UserError
from cli import prune as cli
from pruning import Aggregation, Calibration, Criterion, KeepRules, PruneSpec
from pruning.criteria import CRITERIA, l2, register_criterion

ARCH = {"family": "convnext", "depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 10}


def trained_like(arch=ARCH, seed=0):
    torch.manual_seed(seed)
    model = models.build_model(arch, **({"layer_scale_init_value": 0.5} if arch["family"] == "convnext" else {}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def source(tmp_path):
    model = trained_like()
    path = tmp_path / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"data_set": "DIGITS", "input_size": 32}}, path)
    return model, path


def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.cli
@pytest.mark.parametrize("criterion, flags, spec", [
    ("opnorm", ["--dims", "4", "8", "12", "16"], dict(rules=KeepRules(dims=[4, 8, 12, 16]))),
    ("l1", ["--ratio", "0.4", "--scope", "group"], dict(rules=KeepRules(ratio=0.4), aggregation=Aggregation(scope="group"))),
    ("random", ["--hidden_ratio", "0.5", "--seed", "3"], dict(rules=KeepRules(hidden_ratio=[0.5]), seed=3)),
])
def test_api_on_a_live_model_equals_the_cli_on_its_checkpoint(source, tmp_path, criterion, flags, spec):
    model, path = source
    result = pruning.prune(model, PruneSpec(criterion=criterion, input_size=32, **spec))
    out = tmp_path / "cli.pth"
    assert cli.main(["--checkpoint", str(path), "--output", str(out), "--criterion", criterion, *flags]) == 0
    ckpt = load_checkpoint_file(out)
    assert ckpt["pruning"]["kept"] == {k: [int(i) for i in v] for k, v in result.keep.items()}
    assert ckpt["pruning"]["options"] == result.checkpoint["pruning"]["options"]
    from_cli = models.build_model(ckpt["arch"]).eval()
    from_cli.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert torch.equal(result.model(images()), from_cli(images()))


def test_result_save_and_table(source, tmp_path):
    model, _ = source
    result = pruning.prune(model, PruneSpec(rules=KeepRules(dims=[4, 8, 12, 16])))
    assert "params" in result.table() and "MACs @224px" in result.table()
    path = tmp_path / "p.pth"
    result.save(path)
    with pytest.raises(UserError, match="exists"):
        result.save(path)
    assert load_checkpoint_file(path)["arch"]["dims"] == [4, 8, 12, 16]
    assert result.checkpoint["pruning"]["source"] == "in-memory ConvNeXt"


def test_bad_sources_and_specs_are_plain_errors():
    with pytest.raises(UserError, match="cannot prune a int"):
        pruning.prune(3, PruneSpec(rules=KeepRules(ratio=0.5)))
    with pytest.raises(UserError, match=r"Linear does not run on a 3 x 224 x 224 input \(in Linear\)"):
        pruning.prune(torch.nn.Linear(2, 2), PruneSpec(rules=KeepRules(ratio=0.5)))  # any model is traced
    with pytest.raises(UserError, match="no keep rule"):
        pruning.prune(trained_like(), PruneSpec())
    with pytest.raises(UserError, match=r"KeepRules.ratio must be in \[0, 1\), got 1.5"):
        KeepRules(ratio=1.5)
    with pytest.raises(UserError, match="unknown reduce"):
        Aggregation(reduce="median")
    with pytest.raises(TypeError):
        KeepRules([4, 8])  # keyword-only: no positional swap can go unnoticed


# ----------------------------------------------------------------------------- criteria as objects

@pytest.fixture
def half_l2():
    """A criterion of the test's own: half the L2 norm (the ranking of l2)."""
    crit = register_criterion(Criterion(name="half_l2", score=lambda w: 0.5 * l2(w), summary="test"))
    yield crit
    del CRITERIA["half_l2"]


@pytest.mark.cli
def test_a_registered_criterion_works_in_the_api_and_prune_py(half_l2, source, tmp_path):
    model, path = source
    rules = KeepRules(dims=[4, 8, 12, 16])
    ours = pruning.prune(model, PruneSpec(criterion="half_l2", rules=rules))
    ref = pruning.prune(model, PruneSpec(criterion="l2", rules=rules))
    assert all(torch.equal(ours.keep[k], ref.keep[k]) for k in ref.keep)
    out = tmp_path / "half.pth"
    assert cli.main(["--checkpoint", str(path), "--output", str(out), "--criterion", "half_l2",
                     "--dims", "4", "8", "12", "16"]) == 0
    assert load_checkpoint_file(out)["pruning"]["criterion"] == "half_l2"


@pytest.mark.cli
def test_a_registered_criterion_works_in_compare_criteria(half_l2, source, tmp_path, capsys):
    from cli import compare_criteria
    _, path = source
    assert compare_criteria.main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "cmp"),
                                  "--criteria", "half_l2", "l2", "--budgets", "ratio=0.5", "--seeds", "0",
                                  "--eval_subset", "40"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()]
    accs = {r["criterion"]: r["acc_pruned"] for r in rows}
    assert accs["half_l2"] == accs["l2"]  # the same ranking, so the same pruned model


def test_register_criterion_checks_its_input():
    with pytest.raises(ValueError, match="registered already"):
        register_criterion(Criterion(name="l1", score=l2))
    with pytest.raises(ValueError, match="reads must be one of"):
        Criterion(name="x", score=l2, reads="gradients")
    with pytest.raises(TypeError):
        register_criterion(l2)


# ----------------------------------------------------------------------------- options that apply

OPTIONS = {  # option -> (what PruneSpec gets, the CLI flags)
    "scope": (dict(aggregation=Aggregation(scope="producers")), ["--scope", "producers"]),
    "raw_weights": (dict(raw_weights=True), ["--raw_weights"]),
    "seed": (dict(seed=1), ["--seed", "1"]),
    "calibration": (dict(calibration=Calibration(batches=1, batch_size=4)), ["--calib_batches", "1"]),
}


@pytest.mark.cli
@pytest.mark.parametrize("name", sorted(CRITERIA))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_inapplicable_option_is_refused(source, name, option, capsys):
    crit, (fields, flags) = CRITERIA[name], OPTIONS[option]
    width = crit.score is not None  # a block-only criterion runs with a depth rule
    rules, rule_flags = ((KeepRules(dims=[4, 8, 12, 16]), ["--dims", "4", "8", "12", "16"]) if width
                         else (KeepRules(remove_blocks=1), ["--remove_blocks", "1"]))
    spec = PruneSpec(criterion=name, rules=rules, **fields)
    if option in crit.options():
        assert spec.resolved().criterion is crit
        return
    with pytest.raises(UserError, match="does not apply to criterion"):
        spec.resolved()
    _, path = source
    assert cli.main(["--checkpoint", str(path), "--dry_run", "--criterion", name, *rule_flags, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not apply to criterion" in err and "\n" not in err


def test_what_each_criterion_reads():
    applies = {name: crit.options() for name, crit in CRITERIA.items()}
    assert applies["opnorm"] == {"scope", "raw_weights", "normalize", "reduce"}
    assert applies["random"] == {"scope", "normalize", "reduce", "seed"}
    assert applies["slimming"] == {"normalize", "reduce"}
    assert applies["taylor"] == applies["activation"] == {"normalize", "reduce", "seed", "calibration"}


@pytest.mark.parametrize("name", ["opnorm", "l1", "fpgm", "random", "slimming", "taylor", "activation"])
def test_recorded_options_are_what_was_computed(source, name):
    model, _ = source
    calib = Calibration(data=[(images(), torch.tensor([0, 1, 2, 3]))]) if CRITERIA[name].evidence else None
    result = pruning.prune(model, PruneSpec(criterion=name, rules=KeepRules(dims=[4, 8, 12, 16]), calibration=calib))
    rec = result.checkpoint["pruning"]["options"]
    agg = result.spec.aggregation
    assert (rec["scope"], rec["normalize"], rec["reduce"]) == (agg.scope, agg.normalize, agg.reduce)
    assert rec["scope"] == {"taylor": "group", "activation": "inputs", "slimming": "scales"}.get(
        name, CRITERIA[name].aggregation.scope)
    assert rec["seed"] == (0 if CRITERIA[name].uses_seed else None)
    # the recorded settings, given back explicitly, reproduce the same channels
    again = pruning.prune(model, PruneSpec(criterion=name, rules=KeepRules(dims=rec["dims"]), calibration=calib,
                                           aggregation=Aggregation(scope=rec["scope"], normalize=rec["normalize"],
                                                                   reduce=rec["reduce"])))
    assert all(torch.equal(again.keep[k], result.keep[k]) for k in result.keep)


# ----------------------------------------------------------------------------- stages, data

@pytest.mark.cli
def test_per_stage_hidden_ratio_on_resnet56(tmp_path):
    model = trained_like(models.default_arch("resnet56"))
    result = pruning.prune(model, PruneSpec(criterion="l1", rules=KeepRules(hidden_ratio=[0.5, 0.75, 1.0])))
    assert [sorted({len(v) for k, v in result.keep.items() if k.startswith(f"layer{s}.")}) for s in (1, 2, 3)] \
        == [[8], [24], [64]]
    path = tmp_path / "r56.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, path)
    assert cli.main(["--checkpoint", str(path), "--dry_run", "--hidden_ratio", "0.9", "0.8", "0.7"]) == 0
    with pytest.raises(UserError, match="takes 1 or 3 values"):
        pruning.prune(model, PruneSpec(rules=KeepRules(hidden_ratio=[0.5, 0.5, 0.5, 0.5])))


def test_hidden_ratio_on_a_model_without_hidden_groups_is_refused():
    vgg = trained_like({"family": "vgg_cifar", "cfg": [8, "M", 8], "num_classes": 10})
    with pytest.raises(UserError, match="no hidden"):
        pruning.prune(vgg, PruneSpec(criterion="l1", rules=KeepRules(hidden_ratio=[0.5])))


@pytest.fixture
def image_folder_checkpoint(tmp_path):
    """A 10-class VGG trained (so its args say) on an image_folder data set of real PNG files."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(10):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = (torch.rand(12, 12, 3, generator=gen) * 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    model = trained_like({"family": "vgg_cifar", "cfg": [8, "M", 8], "num_classes": 10})
    path = tmp_path / "vgg.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "args": {
        "data_set": "image_folder", "data_path": str(tmp_path / "train"), "eval_data_path": str(tmp_path / "val"),
        "nb_classes": 10, "input_size": 16}}, path)
    return path


@pytest.mark.cli
@pytest.mark.parametrize("criterion", ["taylor", "activation"])
def test_data_criteria_on_an_image_folder_checkpoint(image_folder_checkpoint, tmp_path, criterion, capsys):
    out = tmp_path / "out.pth"
    assert cli.main(["--checkpoint", str(image_folder_checkpoint), "--output", str(out), "--criterion", criterion,
                     "--calib_batches", "2", "--calib_batch_size", "5", "--ratio", "0.25"]) == 0
    assert "calibration: 10 image_folder training images in 2 batches" in capsys.readouterr().out
    options = load_checkpoint_file(out)["pruning"]["options"]
    assert options["data_set"] == "image_folder" and options["calib_batches"] == 2


@pytest.mark.parametrize("build, message", [
    (lambda: KeepRules(dims=5), "KeepRules.dims takes a list, got 5"),
    (lambda: KeepRules(dims=[8.5, 16, 24, 32]), "KeepRules.dims must be a whole number >= 1, got 8.5"),
    (lambda: KeepRules(ratio="0.5"), "KeepRules.ratio must be a number, got '0.5'"),
    (lambda: KeepRules(ratio=0.5, round_to=1.5), "KeepRules.round_to must be a whole number >= 1, got 1.5"),
    (lambda: KeepRules(target_speedup=2, latency_batch=2.5), "KeepRules.latency_batch must be a whole number"),
    (lambda: PruneSpec(rules=KeepRules(ratio=0.5), seed=1.5), "PruneSpec.seed must be a whole number"),
    (lambda: PruneSpec(rules=KeepRules(ratio=0.5), input_size=float("nan")), "PruneSpec.input_size must be"),
])
def test_the_python_api_refuses_instead_of_coercing(build, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build()


def test_spec_parts_of_the_wrong_type_are_a_type_error():
    with pytest.raises(TypeError, match="PruneSpec.rules must be a KeepRules, not NoneType"):
        PruneSpec(rules=None)


def test_a_damaged_provenance_value_is_left_out_not_a_crash(tmp_path):
    model = trained_like()
    path = tmp_path / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "max_accuracy": torch.tensor([1.0, 2.0]),
                          "epoch": 3, "args": {"data_set": "DIGITS", "input_size": 32}}, path)
    record = pruning.prune(str(path), PruneSpec(rules=KeepRules(ratio=0.5))).checkpoint["pruning"]
    assert "source_max_accuracy" not in record and record["source_epoch"] == 3
