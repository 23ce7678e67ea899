"""The latency keep rule (pruning/latency.py): the fitted model, a speed-up target met, the
per-machine cache, composition with the other rules, bad input.

Nothing here times real code for a verdict: the rule measures through a registered runtime
(deploy.runtime.Runtime) whose runner reports a known cost computed from the model, so the
outcome is the same on a quiet and on a busy machine. Real timings are scripts/' business."""
import json
import math
import os

import pytest
import torch

import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from common.errors import UserError
from deploy.runtime import RUNTIMES, Runtime, register_runtime
from models.complexity import count_macs
from pruning import KeepRules, PruneSpec, open_source, prune
from cli.prune import main as prune_main
from pruning.latency import VARIANTS, LatencyModel, LatencySettings, time_shapes
from pruning.plan import Cut, select

ARCH = {"family": "convnext", "depths": [1, 1, 2, 1], "dims": [32, 64, 96, 128], "num_classes": 10}
SIZE, BATCH = 64, 4


class KnownCost:
    """A runner whose every step 'takes' a cost computed from the model: 1 ms per 10 MMACs of a
    batch, 0.2 ms per conv / Linear (launches), and a square-root term the latency model's
    linear features cannot express exactly (so the re-planning loop has a miss to correct)."""

    def __init__(self, model, settings, num_classes):
        macs = count_macs(model, settings.input_size) * settings.batch_size
        layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
        self.seconds = (macs / 1e7 + 0.2 * layers + 0.002 * math.sqrt(macs / 1e3)) / 1e3

    def warmup(self, mode, steps):
        pass

    def time(self, mode, iters, min_time):
        return [self.seconds] * max(iters, 1)


# The toy runtime: one registration, and --latency_backend / the latency cache take its name.
if "known-cost" not in RUNTIMES:
    register_runtime(Runtime("known-cost", "a stand-in runner with a cost computed from the model",
                             runner=KnownCost, devices=("cpu",), amps=("none",), torch_options=False))
SETTINGS = LatencySettings(backend="known-cost", batch=BATCH)
FLAGS = ["--latency_backend", "known-cost", "--latency_batch", str(BATCH)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("EFFICIENT_CONVNEXT_CACHE")
    os.environ["EFFICIENT_CONVNEXT_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["EFFICIENT_CONVNEXT_CACHE"]
    else:
        os.environ["EFFICIENT_CONVNEXT_CACHE"] = before


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build_model(ARCH, layer_scale_init_value=0.5)
    path = tmp_path_factory.mktemp("src") / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                          "args": {"input_size": SIZE, "data_set": "DIGITS"}}, path)
    return path


@pytest.fixture(scope="module")
def fitted(src, cache):
    source = open_source(str(src))
    return LatencyModel(source.arch, source.groups, SIZE, SETTINGS).load_or_fit()


def uniform(model, share):
    return {g.name: select(g, torch.arange(g.width), max(1, round(share * g.width))) for g in model.groups}


def test_prediction_orders_shapes_as_their_costs_and_is_cached(fitted, cache):
    keeps = [uniform(fitted, s) for s in (1.0, 0.6, 0.3)]
    measured = time_shapes([fitted.arch_of(k) for k in keeps], SIZE, fitted.settings)
    predicted = [fitted.predict(k) for k in keeps]
    assert measured == sorted(measured, reverse=True) and predicted == sorted(predicted, reverse=True)
    assert all(abs(p / m - 1) < 0.1 for p, m in zip(predicted, measured))
    assert fitted.predict({}) == pytest.approx(fitted.features({}) @ fitted.rates)
    cached = json.loads(open(fitted.cache_path).read())
    assert cached["key"]["batch"] == BATCH and cached["key"]["backend"] == "known-cost"
    assert len(cached["samples"]) == VARIANTS + 1
    assert os.path.dirname(fitted.cache_path) == str(cache / "latency")


def test_real_timings_of_the_eager_runtime_are_finite_and_positive(src):
    """The eager runtime's real timer runs; what its numbers are depends on the machine."""
    arch = open_source(str(src)).arch
    ms = time_shapes([arch], 32, LatencySettings(batch=1), rounds=1)
    assert len(ms) == 1 and math.isfinite(ms[0]) and ms[0] > 0


@pytest.mark.cli
def test_target_speedup_is_met_and_recorded_and_the_cache_reused(src, fitted, tmp_path, capsys):
    out = tmp_path / "fast.pth"
    argv = ["--checkpoint", str(src), "--output", str(out), "--target_speedup", "1.6", *FLAGS]
    assert prune_main(argv) == 0
    text = capsys.readouterr()
    assert "timing shape" not in text.err  # the fitted model's cache answered
    report = load_checkpoint_file(out)["pruning"]["latency"]
    assert report["cache"] == fitted.cache_path and report["backend"] == "known-cost"
    assert report["speedup"] == pytest.approx(report["source_ms"] / report["measured_ms"])
    assert report["speedup"] == pytest.approx(1.6, rel=0.03)  # the known costs make 3% a fixed bar
    assert f"{report['speedup']:.2f}x faster (target 1.6x)" in text.out
    assert "predicted" in text.out and "measured" in text.out


def test_latency_rule_composes_with_fixed_groups_and_round_to(src, fitted):
    rules = KeepRules(target_latency=fitted.predict(uniform(fitted, 0.6)), group_ratio=[("stages.0.*", 0)],
                      round_to=4, latency_batch=BATCH, latency_backend="known-cost")
    result = prune(str(src), PruneSpec(rules=rules))
    widths = {g.name: len(result.keep[g.name]) for g in result.source.groups}
    for g in result.source.groups:
        if g.name.startswith("stages.0."):
            assert widths[g.name] == g.width
        else:
            assert widths[g.name] % 4 == 0 or widths[g.name] == g.width
    assert result.latency["target_ms"] == rules.target_latency and result.latency["attempts"] >= 1
    assert sum(widths.values()) < sum(g.width for g in result.source.groups)


@pytest.mark.cli
def test_an_unreachable_target_is_one_line(src, fitted, capsys):
    argv = ["--checkpoint", str(src), "--dry_run", "--target_latency", "0.001", *FLAGS]
    assert prune_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: target cannot be met: the smallest reachable shape is predicted at")


@pytest.mark.parametrize("kwargs, message", [
    ({"target_latency": 5, "target_speedup": 2}, "target_latency and target_speedup exclude each other"),
    ({"target_speedup": 1.0}, r"target_speedup must be in \(1, 1000\]"),
    ({"target_latency": -1}, r"target_latency must be in \(0, 10000000\]"),
    ({"target_latency": float("inf")}, r"target_latency must be in \(0, 10000000\], got inf"),
    ({"ratio": 0.5, "latency_batch": 4}, "latency_batch applies to target_latency / target_speedup"),
    ({"target_speedup": 2, "latency_backend": "tvm"}, "latency_backend must be one of eager, compile"),
    ({"target_speedup": 2, "latency_dtype": "bf16", "latency_backend": "onnxruntime"}, "latency_dtype bf16: the onnxruntime backend runs in fp32"),
    ({"target_speedup": 2, "latency_batch": 0}, "latency_batch must be >= 1"),
    ({"target_speedup": 2, "latency_batch": 2.5}, "latency_batch must be a whole number"),
])
def test_bad_latency_rules_are_refused_before_any_work(kwargs, message):
    with pytest.raises(UserError, match="KeepRules." + message) as e:
        KeepRules(**kwargs)
    assert e.value.for_command_line().startswith("--")  # prune.py names the flag


def test_replanning_brackets_the_target_and_keeps_the_closest_plan(monkeypatch):
    """meet_target's loop on a stand-in model whose real latency is 0.8 x its prediction: the
    second aim scales by the miss, the third interpolates between the bracketing aims, and an
    aim beyond reach ends the loop with the closest plan so far."""
    import pruning.latency as lat

    class Stub:
        arch, input_size, settings = {"family": "stub"}, 32, LatencySettings()
        fit_errors, cache_path = None, None

        def without(self, removed):
            return self

        def predict(self, keep):
            return keep["goal"]

        def arch_of(self, keep):
            return {"ms": 0.8 * keep["goal"] ** 1.1}

    monkeypatch.setattr(lat, "time_shapes", lambda archs, size, settings: [a.get("ms", 100.0) for a in archs])
    goals = []

    def plan(goal):
        goals.append(goal)
        return Cut({"goal": goal})
    cut, report = lat.meet_target(plan, Stub(), target_ms=20.0)
    assert abs(report["miss"]) <= lat.TOLERANCE and report["attempts"] == len(goals) <= lat.ATTEMPTS
    assert goals[1] == pytest.approx(goals[0] * (20.0 / (0.8 * 20.0 ** 1.1)))
    assert report["measured_ms"] == pytest.approx(0.8 * cut.keep["goal"] ** 1.1)

    def unreachable_after_one(goal):
        if goals:
            raise UserError("target cannot be met")
        goals.append(goal)
        return Cut({"goal": goal})
    goals.clear()
    cut, report = lat.meet_target(unreachable_after_one, Stub(), target_ms=5.0)
    assert report["attempts"] == 1 and cut.keep == {"goal": 5.0}
    with pytest.raises(UserError):
        lat.meet_target(lambda goal: (_ for _ in ()).throw(UserError("no")), Stub(), target_ms=5.0)


def test_timings_that_do_not_separate_the_shapes_are_refused_and_not_cached(src, tmp_path, monkeypatch):
    """A machine too busy to time (every shape measured alike) must not give a model that plans
    nothing: one clear error, and no cache file."""
    import pruning.latency as lat
    monkeypatch.setenv("EFFICIENT_CONVNEXT_CACHE", str(tmp_path / "busy"))
    monkeypatch.setattr(lat, "time_shapes", lambda archs, size, settings, rounds=3: [5.0 for _ in archs])
    source = open_source(str(src))
    with pytest.raises(UserError, match="the timed shapes do not separate"):
        LatencyModel(source.arch, source.groups, SIZE, SETTINGS).load_or_fit()
    assert not (tmp_path / "busy").exists()
