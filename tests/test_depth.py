"""Depth pruning (pruning/blocks.py, plan.plan_cut, surgery.remove_blocks): exactness on every
family with removable blocks, renumbering, the rules and their refusals, block scores, the
depth + width planner on a latency model of known costs, compensation and reloading."""
import math
import re

import pytest
import torch

import models
from checkpoints.io import load_checkpoint_file
from common.errors import UserError
from conftest import randomised
from pruning import Calibration, KeepRules, PruneSpec, load, prune
from pruning.blocks import BlockView, branch_opnorm, output_l1, output_l2
from pruning.criteria import get_criterion
from pruning.plan import plan_cut
from pruning.surgery import remove_blocks, renamed_key, silence, silence_blocks

DEEP = {  # one shape per family with several removable blocks per stage
    "convnext": {"family": "convnext", "depths": [2, 3], "dims": [8, 12], "hidden": [[32, 16], [48, 20, 24]],
                 "dw": "standard", "dw_branches": None, "layer_scale": True, "num_classes": 3, "in_chans": 3},
    "convnext_ms": {"family": "convnext", "depths": [2, 3], "dims": [8, 12], "hidden": [[32, 32], [48, 48, 48]],
                    "dw": "multiscale", "dw_branches": [[[2, 4, 2]] * 2, [[3, 6, 3]] * 3], "layer_scale": True,
                    "num_classes": 3, "in_chans": 3},
    "isotropic": {"family": "convnext_isotropic", "depth": 4, "dim": 8, "hidden": [32, 16, 24, 32],
                  "layer_scale": False, "num_classes": 3, "in_chans": 3},
    "resnet": {"family": "resnet_cifar", "depths": [3, 3, 2], "inner": [[16] * 3, [32] * 3, [64] * 2],
               "num_classes": 3, "in_chans": 3},
    "preresnet": {"family": "preresnet_cifar", "depths": [2, 3, 2], "inner": [[16] * 2, [32] * 3, [64] * 2],
                  "num_classes": 3, "in_chans": 3},
    "wrn": {"family": "wrn_cifar", "depths": [2, 2, 2], "widen": 1, "inner": [[16] * 2, [32] * 2, [64] * 2],
            "num_classes": 3, "in_chans": 3},
}


def images(n=4, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.fixture(params=sorted(DEEP))
def deep(request):
    return randomised(DEEP[request.param])


def logits_of(arch, sd, x):
    with torch.no_grad():
        return models.with_weights(arch, sd)(x)


@pytest.mark.parametrize("rules", [KeepRules(remove_blocks=2), KeepRules(remove_blocks=1, ratio=0.3)],
                         ids=["depth", "depth+width"])
def test_removed_blocks_equal_their_branches_zeroed(deep, rules):
    """Removing blocks = the source with their gain tensors zeroed (plus, with width, the cut
    channels silenced: exact through BatchNorm, not through LayerNorm, whose statistics move)."""
    arch = deep.arch
    result = prune(deep, PruneSpec(criterion="l1", rules=rules, input_size=32))
    removed = [b["name"] for b in result.removed_blocks]
    blocks = models.removable_blocks(arch)
    assert len(removed) == rules.remove_blocks and set(removed) <= {b.name for b in blocks}
    x = images()
    dead = silence_blocks(deep.state_dict(), blocks, removed)
    if rules.prunes_width:
        if any(isinstance(m, torch.nn.LayerNorm) for m in deep.modules()):
            return  # checked where the exactness holds: the BatchNorm families
        dead = silence(dead, models.channel_groups(arch), result.keep)
    assert close(logits_of(result.arch, result.checkpoint["model"], x), logits_of(arch, dead, x))


def test_surgery_renumbers_and_layer_ids_follow():
    model = randomised(DEEP["convnext"])
    sd = model.state_dict()
    blocks = models.removable_blocks(model.arch)
    out = remove_blocks(sd, blocks, {"stages.1.0"})
    assert torch.equal(out["stages.1.0.pwconv1.weight"], sd["stages.1.1.pwconv1.weight"])
    assert torch.equal(out["stages.1.1.gamma"], sd["stages.1.2.gamma"])
    assert "stages.1.2.gamma" not in out and torch.equal(out["stages.0.1.gamma"], sd["stages.0.1.gamma"])
    assert renamed_key("stages.1.0.norm.weight", blocks, {"stages.1.0"}) is None
    assert renamed_key("downsample_layers.1.1.weight", blocks, {"stages.1.0"}) == "downsample_layers.1.1.weight"
    arch = models.infer_arch(out)
    assert arch["depths"] == [2, 2] and arch["hidden"] == [[32, 16], [20, 24]]
    pruned = models.with_weights(arch, out)
    ids, layers = models.layer_ids(pruned)
    assert (ids, layers) == models.layer_ids(models.build_model(arch))
    assert ids["stages.1.1.gamma"] == ids["downsample_layers.1.1.weight"]  # one chunk of 3 per stage


def test_depths_rule_removes_the_lowest_scores_per_stage():
    model = randomised(DEEP["convnext"])
    with torch.no_grad():
        model.stages[1][1].gamma.mul_(1e-3)  # the weakest branch of stage 1
    result = prune(model, PruneSpec(criterion="l2", rules=KeepRules(depths=[2, 2]), input_size=32))
    assert [b["name"] for b in result.removed_blocks] == ["stages.1.1"]
    assert result.arch["depths"] == [2, 2]
    record = result.checkpoint["pruning"]
    assert record["removed_blocks"][0]["score"] == pytest.approx(result.block_scores["stages.1.1"])
    assert record["options"]["depths"] == [2, 2]
    assert result.block_scores["stages.1.1"] == min(result.block_scores.values())


def test_remove_blocks_ranks_globally_and_keeps_one_per_stage():
    model = randomised(DEEP["resnet"])
    with torch.no_grad():  # stage 3's removable block is the weakest, stage 1's next
        model.layer3[1].bn2.weight.mul_(1e-4)
        for j in range(3):
            model.layer1[j].bn2.weight.mul_(1e-3 * (j + 1))
    result = prune(model, PruneSpec(criterion="slimming", rules=KeepRules(remove_blocks=3), input_size=32))
    assert [b["name"] for b in result.removed_blocks] == ["layer3.1", "layer1.0", "layer1.1"]
    assert result.arch["depths"] == [1, 3, 1]
    with pytest.raises(UserError, match="only 5 blocks can go"):  # 2 + 2 + 1: each stage keeps one
        prune(model, PruneSpec(criterion="l1", rules=KeepRules(remove_blocks=6), input_size=32))


def _view(model, name, evidence=None, seed=0):
    block = next(b for b in models.removable_blocks(model.arch) if b.name == name)
    return BlockView(block, model.state_dict(), evidence, seed)


def test_block_scores_by_hand():
    model = randomised(DEEP["convnext"])
    sd = model.state_dict()
    v = _view(model, "stages.1.2")
    norm = float(sd["stages.1.2.norm.weight"].abs().max())
    spectral = [float(torch.linalg.matrix_norm(sd[f"stages.1.2.{k}.weight"].double(), ord=2)) for k in ("pwconv1", "pwconv2")]
    gamma = sd["stages.1.2.gamma"].double().abs()
    assert branch_opnorm(v) == pytest.approx(norm * spectral[0] * spectral[1] * float(gamma.max()))
    rows = sd["stages.1.2.pwconv2.weight"].double() * gamma[:, None]
    assert output_l1(v) == pytest.approx(float(rows.abs().sum(1).mean()))
    assert output_l2(v) == pytest.approx(float(rows.norm(dim=1).mean()))
    bn = randomised(DEEP["resnet"])
    s = bn.state_dict()
    gain = s["layer2.1.bn2.weight"].double().abs() / torch.sqrt(s["layer2.1.bn2.running_var"].double() + 1e-5)
    assert branch_opnorm(_view(bn, "layer2.1")) == pytest.approx(float(gain.max()))
    random = get_criterion("random").block_score
    assert random(_view(bn, "layer2.1", seed=3)) == random(_view(bn, "layer2.1", seed=3))
    assert random(_view(bn, "layer2.1", seed=3)) != random(_view(bn, "layer2.1", seed=4))
    taylor = get_criterion("taylor").block_score
    sums = {k: [0.0, 0.0] for k in s}
    sums["layer2.1.bn2.weight"], sums["layer2.1.bn2.bias"] = [1.0, -3.0], [0.5, 1.0]
    assert taylor(_view(bn, "layer2.1", {"saliency_sums": sums})) == pytest.approx((1.5 + 2.0) / 2)


@pytest.mark.parametrize("criterion", ["skip_logits", "skip_output", "taylor"])
def test_data_driven_block_scores(criterion):
    """A block whose branch adds nothing changes nothing when skipped: it scores 0 and goes first."""
    model = randomised(DEEP["convnext"])
    with torch.no_grad():
        model.stages[1][0].gamma.zero_()
    data = [(images(8, seed=s), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(s)))
            for s in range(2)]
    spec = PruneSpec(criterion=criterion, rules=KeepRules(remove_blocks=1), input_size=32,
                     calibration=Calibration(data=data))
    result = prune(model, spec)
    assert [b["name"] for b in result.removed_blocks] == ["stages.1.0"]
    assert result.block_scores["stages.1.0"] == pytest.approx(0, abs=1e-12)
    assert all(v > 0 for k, v in result.block_scores.items() if k != "stages.1.0")


@pytest.mark.parametrize("spec, message", [
    (dict(criterion="l1", rules=KeepRules(depths=[2])), "--depths takes 2 values"),
    (dict(criterion="l1", rules=KeepRules(depths=[2, 4])), "stage 1 has 3 blocks, cannot keep 4"),
    (dict(criterion="fpgm", rules=KeepRules(remove_blocks=1)), "does not score whole blocks"),
    (dict(criterion="activation", rules=KeepRules(depths=[1, 1])), "does not score whole blocks"),
    (dict(criterion="skip_logits", rules=KeepRules(remove_blocks=1, ratio=0.5)), "scores whole blocks only"),
    (dict(criterion="l1", rules=KeepRules(remove_blocks=1), aggregation=__import__("pruning").Aggregation(
        normalize="none")), "--normalize does not apply"),
], ids=["length", "too-many", "fpgm", "activation", "skip-width", "normalize"])
def test_depth_rules_refused(spec, message):
    model = randomised(DEEP["convnext"])
    with pytest.raises(UserError, match=message):
        prune(model, PruneSpec(input_size=32, **spec))


def test_keep_rules_check_depth_values():
    from common.config import FieldError
    for kwargs, message in ((dict(depths=[0, 1]), "depths must be >= 1"), (dict(remove_blocks=0), ">= 1"),
                            (dict(prune_depth=True), "latency target"), (dict(prune_depth=1), "true or false"),
                            (dict(depths=[1, 1], remove_blocks=1), "exclude each other")):
        with pytest.raises(FieldError, match=message):
            KeepRules(**kwargs)
    result = prune(randomised(DEEP["convnext"]), PruneSpec(criterion="l1", rules=KeepRules(depths=[1, 1]),
                                                           input_size=32))
    assert result.arch["depths"] == [1, 1] and len(result.removed_blocks) == 3


def test_a_stage_with_a_downsampling_block_keeps_it():
    model = randomised(DEEP["resnet"])
    result = prune(model, PruneSpec(criterion="l1", rules=KeepRules(depths=[1, 1, 1]), input_size=32))
    names = {b["name"] for b in result.removed_blocks}
    assert len(names) == 5 and "layer2.0" not in names and "layer3.0" not in names
    assert result.arch["depths"] == [1, 1, 1]


def test_a_model_without_blocks_is_refused():
    vgg = randomised(models.FAMILIES["vgg_cifar"].example_arch())
    with pytest.raises(UserError, match="declares no removable blocks"):
        prune(vgg, PruneSpec(criterion="l1", rules=KeepRules(remove_blocks=1), input_size=32))


class KnownCosts:
    """A latency model with known costs: `per_channel` ms per kept channel of the scored
    groups, `per_block` ms per block kept (its fixed overhead)."""

    def __init__(self, groups, per_channel, per_block, blocks, removed=()):
        self.groups, self.per_channel, self.per_block, self.blocks = groups, per_channel, per_block, blocks
        self.removed = tuple(removed)

    def without(self, removed):
        return KnownCosts(self.groups, self.per_channel, self.per_block, self.blocks, removed)

    def predict(self, keep):
        gone = set(self.removed)
        channels = sum(len(keep.get(g.name, range(g.width))) for g in self.groups
                       if not any(p.key.startswith(n + ".") for n in gone for p in g.slices[:1]))
        return self.per_channel * channels + self.per_block * (len(self.blocks) - len(gone))


@pytest.mark.parametrize("per_block, share, expect_blocks", [(0.0, 0.95, False), (1000.0, 0.5, True)],
                         ids=["narrowing-is-cheaper", "only-blocks-reach-it"])
def test_depth_and_width_planner(per_block, share, expect_blocks):
    """On a latency model of known costs: a goal a few weak channels reach removes no block; a
    goal only fewer blocks reach (each costs far more than all channels) removes blocks."""
    from pruning.scoring import score_groups
    model = randomised(DEEP["convnext"])
    arch, sd = model.arch, model.state_dict()
    groups, blocks = models.channel_groups(arch), models.removable_blocks(arch)
    crit = get_criterion("l2")
    scores = score_groups(sd, groups, crit)
    block_scores = {b.name: crit.block_score(BlockView(b, sd)) for b in blocks}
    lat = KnownCosts(groups, 1.0, per_block, blocks)
    goal = lat.predict({}) * share
    rules = KeepRules(target_latency=1.0, prune_depth=True)
    cut = plan_cut(groups, scores, rules, latency=(lat, goal), blocks=blocks, block_scores=block_scores, depths=[2, 3])
    assert lat.without(cut.removed).predict(cut.keep) <= goal
    assert bool(cut.removed) == expect_blocks
    assert {b.stage for b in blocks if b.name not in cut.removed} == {0, 1}  # each stage keeps a block
    if expect_blocks:
        assert len(cut.removed) >= 2  # 1000 ms a block: half the time needs more than one


def test_compensate_after_blocks_go():
    model = randomised(DEEP["convnext"])
    data = [(images(8, seed=s), torch.zeros(8, dtype=torch.long)) for s in range(2)]
    spec = PruneSpec(criterion="l2", rules=KeepRules(remove_blocks=1, ratio=0.3), input_size=32,
                     calibration=Calibration(data=data), compensate="refit")
    result = prune(model, spec)
    plain = prune(model, PruneSpec(criterion="l2", rules=KeepRules(remove_blocks=1, ratio=0.3), input_size=32))
    assert result.arch == plain.arch and result.removed_blocks == plain.removed_blocks
    assert result.checkpoint["pruning"]["compensation"]["layernorms"] > 0
    x = images(8, seed=0)
    with torch.no_grad():
        dense = model(x)
        err = [float((m(x) - dense).square().mean()) for m in (result.model, plain.model)]
    assert err[0] < err[1]  # fit to the dense model on these images


def test_depth_pruned_checkpoint_reloads_and_records(tmp_path):
    model = randomised(DEEP["preresnet"])
    result = prune(model, PruneSpec(criterion="opnorm", rules=KeepRules(remove_blocks=2), input_size=32))
    for name in ("p.pth", "p.safetensors"):
        result.save(tmp_path / name)
        back = load(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(back(images()), result.model(images()))
    ckpt = load_checkpoint_file(tmp_path / "p.pth")
    assert [b["name"] for b in ckpt["pruning"]["removed_blocks"]] == [b["name"] for b in result.removed_blocks]
    assert all(math.isfinite(b["score"]) for b in ckpt["pruning"]["removed_blocks"])
    assert sum(ckpt["arch"]["depths"]) == 5


def test_latency_model_counts_removed_blocks():
    from pruning.latency import FEATURES, LatencyModel, LatencySettings
    arch = DEEP["convnext"]
    lm = LatencyModel(arch, models.channel_groups(arch), 32, LatencySettings())
    lm.rates = torch.ones(len(FEATURES), dtype=torch.float64).numpy()
    full, less = lm.features({}), lm.without(["stages.1.1"]).features({})
    layers = FEATURES.index("layers")
    assert full[layers] - less[layers] == 4  # norm, pwconv1, pwconv2 (and its gamma-free dwconv)
    assert lm.without(["stages.1.1"]).predict({}) < lm.predict({})
    assert lm.without(["stages.1.1"]).arch_of({})["depths"] == [2, 2]
    shapes = lm._variants()
    assert any(removed for _, removed in shapes) and any(not removed for _, removed in shapes[1:])


def test_timm_builds_a_depth_pruned_convnext():
    arch = {**DEEP["convnext"], "hidden": [[32, 32], [48, 48, 48]]}
    model = randomised(arch)
    result = prune(model, PruneSpec(criterion="l1", rules=KeepRules(depths=[1, 2]), input_size=32))
    name, model_args, _ = models.timm_export(result.arch, result.checkpoint["model"])
    assert model_args["depths"] == [1, 2]


@pytest.mark.cli
def test_prune_cli_depth_flags(tmp_path, capsys):
    from checkpoints.io import save_checkpoint_file
    from cli.prune import main
    model = randomised(DEEP["convnext"])
    src = tmp_path / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, src)
    assert main(["--checkpoint", str(src), "--list_groups"]) == 0
    out = capsys.readouterr().out
    assert "removable blocks (--depths, --remove_blocks, --drop_blocks) per stage: 2 of 2, 3 of 3" in out and "stages.1.2" in out
    assert main(["--checkpoint", str(src), "--output", str(tmp_path / "p.pth"), "--depths", "1", "2",
                 "--criterion", "opnorm", "--input_size", "32"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 blocks (block score): " in out and re.search(r"blocks per stage +2,3 +1,2\n", out)
    assert main(["--checkpoint", str(src), "--dry_run", "--prune_depth", "true"]) == 2
    assert "latency target" in capsys.readouterr().err
    from cli import export
    assert export.main(["--checkpoint", str(tmp_path / "p.pth"), "--output", str(tmp_path / "p.onnx"),
                        "--input_size", "32", "--parity_images", "4"]) in (0, None)


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory):
    """A ConvNeXt with two blocks per stage that says it was trained on DIGITS at 32 px."""
    from checkpoints.io import save_checkpoint_file
    model = randomised({**DEEP["convnext"], "num_classes": 10})
    path = tmp_path_factory.mktemp("src") / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"data_set": "DIGITS", "input_size": 32}}, path)
    return path


@pytest.mark.cli
def test_sensitivity_removes_one_block_at_a_time(digits_source, tmp_path, capsys):
    from cli import sensitivity
    out = tmp_path / "sens"
    assert sensitivity.main(["--checkpoint", str(digits_source), "--output_dir", str(out), "--blocks", "true",
                             "--criterion", "l1", "--eval_subset", "40", "--tolerance", "100"]) in (0, None)
    text = capsys.readouterr().out
    rows = [__import__("json").loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = [b.name for b in models.removable_blocks(DEEP["convnext"])]
    assert sorted(r["set"] for r in rows) == sorted(names) and {r["ratio"] for r in rows} == {1.0}
    assert "--drop_blocks " + " ".join(names) in text and (out / "sensitivity.png").stat().st_size > 1000
    assert sensitivity.main(["--checkpoint", str(digits_source), "--output_dir", str(tmp_path / "x"), "--blocks",
                             "true", "--sets", "stages.0.*"]) == 2
    assert sensitivity.main(["--checkpoint", str(digits_source), "--output_dir", str(tmp_path / "x"), "--blocks",
                             "true", "--ratios", "0.5"]) == 2


@pytest.mark.cli
def test_compare_criteria_depth_budgets(digits_source, tmp_path, capsys):
    from cli import compare_criteria
    from cli.compare_criteria import budget_argv
    arch = DEEP["convnext"]
    assert budget_argv("depths=1,2+ratio=0.5", arch, 32) == ["--depths", "1", "2", "--ratio", "0.5"]
    assert budget_argv("speedup=3+prune_depth+latency_batch=16", arch, 32) == [
        "--target_speedup", "3", "--prune_depth", "true", "--latency_batch", "16"]
    assert budget_argv("blocks=2", arch, 32) == ["--remove_blocks", "2"]
    out = tmp_path / "cmp"
    assert compare_criteria.main(["--checkpoint", str(digits_source), "--output_dir", str(out), "--criteria", "l1",
                                  "random", "--budgets", "blocks=2", "depths=1,2+ratio=0.3", "--seeds", "0", "1",
                                  "--eval_subset", "40"]) in (0, None)
    rows = [__import__("json").loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["criterion"], r["budget"]) for r in rows} == {(c, b) for c in ("l1", "random")
                                                             for b in ("blocks=2", "depths=1,2+ratio=0.3")}
    assert "| blocks=2 | l1 |" in capsys.readouterr().out


@pytest.mark.cli
def test_exactness_script(digits_source, capsys):
    import importlib.util
    from helpers import ROOT
    spec = importlib.util.spec_from_file_location("depth_exactness", ROOT / "scripts/depth_exactness.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--checkpoint", str(digits_source), "--remove_blocks", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | " in out and "exact: every difference <= 1e-05" in out


@pytest.mark.e2e
def test_a_depth_pruned_checkpoint_fine_tunes(digits_source, tmp_path):
    import subprocess
    import sys
    from helpers import ENV, ROOT
    pruned = tmp_path / "p.pth"
    prune(str(digits_source), PruneSpec(criterion="opnorm", rules=KeepRules(depths=[1, 2]))).save(pruned)
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--finetune", str(pruned), "--epochs", "1",
                           "--batch_size", "64", "--lr", "1e-3", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0",
                           "--reprob", "0", "--aa", "none", "--smoothing", "0", "--num_workers", "0", "--device", "cpu",
                           "--drop_path", "0.1", "--layer_decay", "0.8", "--data_set", "DIGITS", "--input_size", "32",
                           "--output_dir", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint_file(out / "checkpoint-0.pth")
    assert ckpt["arch"]["depths"] == [1, 2] and "stages.1.1.gamma" in ckpt["model"]


def test_depth_study_tables_pair_depth_with_width():
    """The study's tables from rows: depth - width paired by dense model (after pruning) and by
    dense model and seed (fine-tuned, random floor); a dense model missing a plan is left out."""
    from studies.depth import tables
    rows = []
    for d in range(3):
        for mode, acc in (("width", 80.0 + d), ("depth", 82.0 + 2 * d)):
            cell = f"d{d}/eager/3x/{mode}"
            if d == 2 and mode == "depth":
                continue  # cut short
            rows.append({"step": f"{cell}/opnorm", "acc": acc, "speedup": 3.0, "macs_ratio": 3.0 if mode == "width" else 2.5,
                         "removed": 0 if mode == "width" else 3, "seconds": 1.0, "attempts": 1, "plan_seconds": 0.1})
            rows += [{"step": f"{cell}/random{s}", "acc": acc - 5 + s} for s in (0, 1)]
            rows += [{"step": f"{cell}/opnorm/ft{s}", "acc": acc + 10 + s} for s in (0, 1)]
    main, diffs, cost = tables(rows, 3, "opnorm", [("eager", [3.0])], [0, 1], [0, 1])
    assert "| eager | 3x | opnorm, depth | 3.00 +- 0.00 | 2.50 +- 0.00 | 1.20 +- 0.00 | 3/3 |" in main[3]
    # dense models 0 and 1: depth - width = 2 and 3 after pruning, the same per seed after fine-tuning
    assert diffs[2].startswith("| eager | 3x | 2.50 +- 6.35 (n = 2) | 2.50 +- 0.92 * (n = 4) | 2.50 +- 0.92 * (n = 4) |")
    assert len(cost) == 4
