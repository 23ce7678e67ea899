"""--compensate (pruning/compensate.py) and the diagnosis behind it (pruning/diagnosis.py,
pruning/diagnose.py), on tiny models with weights away from their init."""
import json
import logging
import math

import pytest
import torch
import torch.nn as nn


import models
import pruning
from checkpoints.io import save_checkpoint_file
from common.errors import UserError
from pruning import Calibration, KeepRules, PruneSpec
from pruning.compensate import compensate
from pruning.diagnosis import diagnose
from pruning.probe import capture

from conftest import randomised

ARCH = {"family": "convnext", "depths": [1, 2], "dims": [8, 12], "num_classes": 3}


def planted(seed=0):
    """A tiny ConvNeXt whose stem channel 0 carries a very large activation (the stem norm's
    bias), as ConvNeXt streams do."""
    model = randomised(ARCH, seed)
    with torch.no_grad():
        model.downsample_layers[0][1].bias[0] = 30.0
        model.downsample_layers[1][0].weight.fill_(1.0)
    return model


def images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 32, 32, generator=g) for _ in range(n)]


def calib(xs):
    return Calibration(data=[(x, torch.zeros(len(x), dtype=torch.int64)) for x in xs])


def prune(model, dims, compensate="none", xs=None, criterion="l1"):
    return pruning.prune(model, PruneSpec(criterion=criterion, rules=KeepRules(dims=dims), compensate=compensate,
                                          calibration=calib(xs or images()) if compensate != "none" else None))


def normalised(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def test_keep_all_is_the_identity():
    model = planted()
    keep = {g.name: torch.arange(g.width) for g in models.channel_groups(model.arch)}
    sd = model.state_dict()
    for method in ("stats", "refit"):
        out, report = compensate(model.arch, sd, model.arch, sd, models.channel_groups(model.arch), keep,
                                 calib(images()).data, method)
        assert report == {"layernorms": 0, "batchnorms": 0}
        assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_stats_matches_the_normalised_outputs_of_the_cut_norm():
    """The next block's norm after a cut stream with a planted channel: per channel, the pruned
    norm's normalised outputs are fit to the dense ones (least squares: equal means, no worse
    error), which the uncompensated model misses by far."""
    model, xs = planted(), images()
    plain, comp = prune(model, [4, 12]), prune(model, [4, 12], "stats", xs)
    kept = plain.keep["stages.0.residual"]
    assert 0 in kept.tolist()  # l1 keeps the planted channel
    name = "stages.0.0.norm"
    x = torch.cat(xs)
    with torch.no_grad():
        dense_out = model.get_submodule(name)(capture(model, name, x))[..., kept]
    errors = {}
    for label, result in (("plain", plain), ("stats", comp)):
        with torch.no_grad():
            out = result.model.get_submodule(name)(capture(result.model, name, x))
        errors[label] = float(((out - dense_out) ** 2).mean())
        if label == "stats":
            assert torch.allclose(out.mean((0, 1, 2)), dense_out.mean((0, 1, 2)), atol=1e-4)
    assert errors["stats"] < 0.5 * errors["plain"]
    assert comp.checkpoint["pruning"]["options"]["compensate"] == "stats"
    assert comp.checkpoint["pruning"]["compensation"]["layernorms"] >= 1


def test_refit_brings_the_logits_closer_than_stats():
    model, xs = planted(), images(3)
    with torch.no_grad():
        dense = model(torch.cat(xs))
    err = {}
    for method in ("none", "stats", "refit"):
        with torch.no_grad():
            err[method] = float(((prune(model, [4, 6], method, xs).model(torch.cat(xs)) - dense) ** 2).mean())
    assert err["refit"] < err["stats"] and err["refit"] < err["none"]


def test_batch_norms_are_measured_again():
    arch = models.FAMILIES["resnet_cifar"].example_arch()
    model, xs = randomised(arch), images()
    result = pruning.prune(model, PruneSpec(criterion="l1", rules=KeepRules(ratio=0.5), compensate="stats",
                                            calibration=calib(xs)))
    assert result.checkpoint["pruning"]["compensation"]["batchnorms"] > 0
    pruned = result.model
    name = next(n for n, m in pruned.named_modules() if isinstance(m, nn.BatchNorm2d))
    seen = torch.cat([capture(pruned, name, x) for x in xs])
    assert torch.allclose(pruned.get_submodule(name).running_mean, seen.mean((0, 2, 3)), atol=1e-5)


def test_compensated_models_fold_and_export_exactly(tmp_path):
    from cli import export
    from deploy.runners import export_onnx
    result = prune(planted(), [4, 6], "refit")
    model, x = result.model, torch.cat(images(1))
    folded = export.fold(model, x)
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5
    path = tmp_path / "m.onnx"
    export_onnx(folded, x[:2], str(path))
    diff, _, agree = export.parity(str(path), model, x)
    assert diff <= 1e-5 and agree == 1.0


@pytest.mark.cli
def test_spec_and_cli_refuse_bad_compensation(source, capsys):
    with pytest.raises(UserError, match="PruneSpec.compensate must be one of none, stats, refit, got 'x'"):
        PruneSpec(rules=KeepRules(ratio=0.5), compensate="x")
    with pytest.raises(UserError, match="--seed does not apply"):
        PruneSpec(criterion="opnorm", rules=KeepRules(ratio=0.5), seed=1).resolved()
    spec = PruneSpec(criterion="opnorm", rules=KeepRules(ratio=0.5), compensate="refit", seed=1).resolved()
    assert spec.seed == 1 and spec.calibration == Calibration()
    from cli.prune import main
    logging.getLogger().handlers.clear()
    assert main(["--checkpoint", str(source), "--dry_run", "--ratio", "0.5", "--compensate", "stat"]) == 2
    assert "invalid choice: 'stat'" in capsys.readouterr().err


@pytest.mark.e2e
def test_compensation_refuses_to_guess_the_images():
    with pytest.raises(UserError, match="does not record the data it was trained on"):
        pruning.prune(planted(), PruneSpec(criterion="l1", rules=KeepRules(dims=[4, 6]), compensate="refit"))


@pytest.mark.cli
def test_prune_py_compensates_on_the_checkpoints_data(source, tmp_path, capsys):
    from cli.prune import main
    out = tmp_path / "p.pth"
    assert main(["--checkpoint", str(source), "--output", str(out), "--dims", "8", "16", "--compensate", "refit",
                 "--calib_batches", "2", "--calib_batch_size", "8", "--seed", "3"]) == 0
    assert "compensation refit: 5 LayerNorms refit, 0 BatchNorms re-measured on 16 DIGITS training images" \
        in capsys.readouterr().out
    record = torch.load(out, weights_only=True)["pruning"]
    assert record["options"]["compensate"] == "refit" and record["options"]["seed"] == 3
    assert record["compensation"]["images"] == 16


# ---------------------------------------------------------------------------------- diagnosis

def test_diagnosis_numbers_match_a_hand_computation():
    model, xs = planted(), images()
    result = prune(model, [4, 12])
    kept = result.keep["stages.0.residual"]
    rows = {r.name: r for r in diagnose(model, result.model, models.channel_groups(model.arch), result.keep, xs)}
    row = rows["stages.0.0.norm"]
    name = "stages.0.0.norm"
    d = torch.cat([capture(model, name, x) for x in xs]).double()  # (N, H, W, C)
    p = torch.cat([capture(result.model, name, x) for x in xs]).double()
    tokens, kept_tokens = d.reshape(-1, 8), d.reshape(-1, 8)[:, kept]
    assert row.energy == pytest.approx(float((kept_tokens ** 2).sum() / (tokens ** 2).sum()), rel=1e-9)
    shift = ((kept_tokens.mean(1) - tokens.mean(1)).abs() / tokens.var(1, unbiased=False).sqrt()).mean()
    ratio = torch.exp(torch.log(kept_tokens.var(1, unbiased=False) / tokens.var(1, unbiased=False)).mean())
    assert row.sel_shift == pytest.approx(float(shift), rel=1e-6)
    assert row.sel_var == pytest.approx(float(ratio), rel=1e-6)
    cos = nn.functional.cosine_similarity(d[..., kept].flatten(1), p.flatten(1), dim=1).mean()
    assert row.cos_in == pytest.approx(float(cos), rel=1e-9)
    rms = (tokens ** 2).mean(0).sqrt()
    assert row.peak == pytest.approx(float(rms.max() / rms.median()), rel=1e-9)
    assert row.top_kept == sum(int(i) in kept.tolist() for i in torch.argsort(rms, descending=True)[:5])
    assert rows["downsample_layers.0.1"].cos_in == pytest.approx(1.0)  # the stem conv's kept rows are exact
    assert row.kept == 4 and row.width == 8 and row.stage == 0


@pytest.mark.cli
def test_diagnose_tool(source, tmp_path, capsys):
    from cli.prune import main as prune_main
    pruned = []
    for crit in ("l1", "random"):
        path = tmp_path / f"{crit}.pth"
        assert prune_main(["--checkpoint", str(source), "--output", str(path), "--dims", "8", "16",
                           "--criterion", crit]) == 0
        pruned.append(str(path))
    capsys.readouterr()
    from cli.diagnose import main as diagnose_main
    assert diagnose_main(["--checkpoint", str(source), "--pruned", *pruned, "--calib_batches", "2",
                          "--calib_batch_size", "4", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 DIGITS training images at 32 px" in out and "per stage" in out and "random.pth" in out
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert set(data) == {"l1.pth", "random.pth"} and data["l1.pth"][-1]["name"] == "norm"
    assert all(0 < r["energy"] <= 1 and not math.isnan(r["cos_out"]) for r in data["l1.pth"])
    assert (tmp_path / "diagnosis.png").stat().st_size > 0
    # refusals: files present, a checkpoint that is not a pruned copy of the source
    assert diagnose_main(["--checkpoint", str(source), "--pruned", *pruned, "--output_dir", str(tmp_path)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    save_checkpoint_file({"model": planted().state_dict(), "arch": planted().arch}, other)
    assert diagnose_main(["--checkpoint", str(source), "--pruned", str(other)]) == 2
    assert "records no kept channels" in capsys.readouterr().err


@pytest.mark.cli
def test_compare_criteria_runs_compensated_cells_per_seed(source, tmp_path):
    from cli import compare_criteria
    logging.getLogger().handlers.clear()
    assert compare_criteria.main(["--checkpoint", str(source), "--output_dir", str(tmp_path / "cmp"),
                                  "--criteria", "l1", "l1:compensate=refit,calib_batches=1", "--budgets",
                                  "dims=8,16", "--seeds", "0", "1", "--eval_subset", "40"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()]
    seeds = {r["criterion"]: sorted(x["seed"] for x in rows if x["criterion"] == r["criterion"]) for r in rows}
    assert seeds == {"l1": [0], "l1:compensate=refit,calib_batches=1": [0, 1]}  # its images are drawn per seed
