"""Whole-group and data-driven importance: hand computations on a tiny VGG, the CLI."""

import pytest
import torch
import torch.nn.functional as F

import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from pruning.calibration import measure
from cli.prune import main as prune_main
from pruning.scoring import score_group, score_groups
from pruning.criteria import Aggregation, get_criterion

ARCH = {"family": "vgg_cifar", "cfg": [4, "M", 6], "num_classes": 3, "in_chans": 3}


@pytest.fixture
def vgg():
    torch.manual_seed(0)
    model = models.build_model(ARCH).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
            m.running_mean.data.uniform_(-1, 1)
    groups = {g.name: g for g in models.channel_groups(ARCH)}
    return model, groups


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, 8, 8, generator=gen), torch.randint(0, 3, (5,), generator=gen))
            for _ in range(2)]


def test_group_magnitude_is_a_sum_over_every_slice(vgg):
    model, groups = vgg
    sd = model.state_dict()
    first, second = groups["conv1_1"], groups["conv2_1"]
    hand = (sd["feature.0.weight"].flatten(1).norm(dim=1) + sd["feature.1.weight"].abs()
            + sd["feature.4.weight"].transpose(0, 1).flatten(1).norm(dim=1)).double()
    got = score_group(sd, first, "l2", aggregation=Aggregation(scope="group", normalize="none", reduce="sum"))
    assert torch.allclose(got.score, hand)
    assert len(got.sources) == 3  # biases and running statistics are not scored
    rows = [sd["feature.4.weight"].flatten(1).abs().sum(1), sd["feature.5.weight"].abs(),
            sd["classifier.weight"].abs().sum(0)]
    hand = torch.stack([r.double() / r.double().mean() for r in rows]).mean(0)
    got = score_group(sd, second, "l1", aggregation=Aggregation(scope="group", normalize="mean", reduce="mean"))
    assert torch.allclose(got.score, hand)
    # the default scope reads the producer alone
    assert torch.allclose(score_group(sd, first, "l2", aggregation=Aggregation(normalize="none")).score,
                          sd["feature.0.weight"].flatten(1).norm(dim=1).double())


def test_taylor_is_weight_times_gradient_over_the_group(vgg):
    model, groups = vgg
    data = batches()
    evidence = measure(ARCH, model.state_dict(), data, ("saliency",))
    model.zero_grad()
    total = sum(len(y) for _, y in data)
    for x, y in data:
        (F.cross_entropy(model(x), y, reduction="sum") / total).backward()
    p = dict(model.named_parameters())
    sal = {k: (v * v.grad).abs().double() for k, v in p.items()}
    hand = (sal["feature.0.weight"].flatten(1).sum(1) + sal["feature.1.weight"]
            + sal["feature.4.weight"].transpose(0, 1).flatten(1).sum(1))
    got = score_group(model.state_dict(), groups["conv1_1"], "taylor", evidence=evidence, aggregation=Aggregation(normalize="none", reduce="sum"))
    assert torch.allclose(got.score, hand, rtol=1e-5, atol=1e-12)


def test_activation_is_mean_abs_input_of_the_consumers(vgg):
    model, groups = vgg
    data = batches()
    evidence = measure(ARCH, model.state_dict(), data, ("activation",))
    with torch.no_grad():
        pooled = torch.cat([model.feature[:4](x) for x, _ in data])  # conv, BN, ReLU, max-pool
        head_in = torch.cat([model.feature(x).mean((2, 3)) for x, _ in data])
    hand1 = pooled.abs().mean((0, 2, 3)).double()
    hand2 = head_in.abs().mean(0).double()
    scores = score_groups(model.state_dict(), list(groups.values()), "activation", evidence=evidence, aggregation=Aggregation(normalize="none"))
    assert torch.allclose(scores["conv1_1"].score, hand1, rtol=1e-5)
    assert torch.allclose(scores["conv2_1"].score, hand2, rtol=1e-5)


def test_data_criteria_need_evidence(vgg):
    model, groups = vgg
    with pytest.raises(Exception, match="calibration data"):
        score_group(model.state_dict(), groups["conv1_1"], "taylor")


def test_multiscale_branches_are_scored_where_they_cover():
    arch = models.meta_model({"family": "convnext", "depths": [1], "dims": [16], "dw": "multiscale",
                              "num_classes": 3}).arch
    torch.manual_seed(0)
    model = models.build_model(arch)
    sd = model.state_dict()
    groups = models.channel_groups(arch)
    for criterion in ("l1", "opnorm", "random"):
        scores = score_groups(sd, groups, criterion, aggregation=Aggregation(scope="group"))
        assert all(bool(torch.isfinite(s.score).all()) for s in scores.values())
    gen = torch.Generator().manual_seed(0)
    x = [(torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0, 1]))]
    for kind in ("taylor", "activation"):
        evidence = measure(arch, sd, x, (get_criterion(kind).evidence,))
        scores = score_groups(sd, groups, kind, evidence=evidence)
        assert all(bool(torch.isfinite(s.score).all()) for s in scores.values())


@pytest.fixture
def digits_vgg(tmp_path):
    torch.manual_seed(0)
    arch = {"family": "vgg_cifar", "cfg": [8, "M", 8], "num_classes": 10, "in_chans": 3}
    model = models.build_model(arch)
    path = tmp_path / "vgg.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"data_set": "DIGITS", "input_size": 16}}, path)
    return path


@pytest.mark.cli
def test_cli_taylor_calibrates_on_the_checkpoints_data(digits_vgg, tmp_path, capsys):
    out = tmp_path / "out.pth"
    assert prune_main(["--checkpoint", str(digits_vgg), "--output", str(out), "--criterion", "taylor",
                       "--calib_batches", "2", "--calib_batch_size", "8", "--ratio", "0.25"]) == 0
    assert "calibration: 16 DIGITS training images in 2 batches" in capsys.readouterr().out
    pruned = load_checkpoint_file(out)
    assert pruned["pruning"]["options"]["calib_batches"] == 2
    assert sum(v for v in pruned["arch"]["cfg"] if v != "M") == 12


@pytest.mark.cli
@pytest.mark.parametrize("argv,message", [
    (["--criterion", "l1", "--calib_batches", "4"], "calibration (--calib_batches, --calib_batch_size, --data_set, --data_path) does not apply"),
    (["--criterion", "activation", "--calib_batches", "0"], "--calib_batches must be >= 1"),
    (["--criterion", "l1", "--scope", "everything"], "invalid choice"),
])
def test_cli_calibration_errors(digits_vgg, tmp_path, capsys, argv, message):
    out = tmp_path / "out.pth"
    assert prune_main(["--checkpoint", str(digits_vgg), "--output", str(out), "--ratio", "0.5", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()
