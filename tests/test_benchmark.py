"""scripts/benchmark.py: its counts and its output formats, on tiny models (no speed asserted)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import models
from models.complexity import count_macs, count_params, forward_cost
from checkpoints.io import save_checkpoint_file
from cli import benchmark as cli_benchmark
from common.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")
TINY_ARCH = {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32],
             "hidden": [[16], [40], [96], [64]], "dw": "standard", "dw_branches": None,
             "num_classes": 10, "in_chans": 3}
FAST = ["--input_size", "32", "--batch_size", "2", "--iters", "2", "--warmup", "1"]


bench = cli_benchmark


def _run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of a tiny pruned-shape ConvNeXt, with its `arch`, as training writes it."""
    torch.manual_seed(0)
    model = models.build_model(TINY_ARCH)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "epoch": 0}, path)
    return str(path)


def test_macs_of_one_conv_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    macs, outputs = forward_cost(conv, input_size=8, in_chans=3)
    assert macs == 3 * 8 * 9 * 64  # C_in * C_out * k*k * H_out*W_out; bias adds no MACs
    assert outputs == 8


def test_macs_of_linear_head_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=2, stride=2), nn.Flatten(), nn.Linear(4 * 16, 5))
    macs, outputs = forward_cost(model, input_size=8)
    assert macs == 3 * 4 * 4 * 16 + 64 * 5
    assert outputs == 5


def test_timm_convnext_mirror_has_our_shape():
    ours = models.create_model("convnext_tiny_3M_pruned_cifar10")
    theirs = bench.build("timm_convnext:convnext_tiny_3M_pruned_cifar10")
    assert type(theirs).__module__ == "timm.models.convnext"
    assert count_params(theirs) == count_params(ours)
    assert count_macs(theirs, 32) == count_macs(ours, 32)
    gammas = [p for n, p in theirs.named_parameters() if n.endswith("gamma")]
    assert gammas and float(gammas[0].detach()[0]) == pytest.approx(1e-6)  # layer scale matched


def test_settings_syntax():
    base = bench.Settings("cpu", 32, 4)
    s = bench.parse_settings("channels_last=1, amp=bf16,batch_size=8", base)
    assert (s.channels_last, s.amp, s.batch_size, s.compile) == (True, "bf16", 8, False)
    assert bench.parse_settings("", base) == base
    for bad in ("channels_last", "colour=1", "amp=fp8", "batch_size=0", "amp=fp16"):
        with pytest.raises(UserError):
            bench.parse_settings(bad, base)


def test_percentile_nearest_rank():
    values = list(range(1, 11))
    assert bench.percentile(values, 90) == 9
    assert bench.percentile(values, 50) == 5
    assert bench.percentile(values, 100) == 10 and bench.percentile(values, 0) == 1
    assert bench.percentile([3.0], 90) == 3.0


@pytest.mark.e2e
def test_end_to_end_json_table_and_plot(tmp_path, tiny_ckpt):
    out_json, out_png = tmp_path / "r.jsonl", tmp_path / "r.png"
    res = _run("--models", tiny_ckpt, "convnext_tiny_3M_pruned_cifar10", *FAST,
               "--json", str(out_json), "--plot", str(out_png))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["model"] for r in rows] == [tiny_ckpt, "convnext_tiny_3M_pruned_cifar10"]
    for r in rows:
        assert set(r) == set(bench.JSON_FIELDS)
        assert all(r[k] is not None for k in bench.JSON_FIELDS), r
        assert r["eval_img_s"] > 0 and r["train_img_s"] > 0
        assert r["latency_ms_p90"] >= r["latency_ms_median"] > 0
    tiny = models.build_model(TINY_ARCH)
    assert rows[0]["params"] == sum(p.numel() for p in tiny.parameters())
    assert rows[0]["macs"] == count_macs(tiny, 32)
    table = [line for line in res.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "speed-up" in table[0] and "MACs ratio" in table[0]
    assert "| 1.00x | 1.00x |" in table[2]  # the first model is the reference
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cli
def test_skip_leaves_fields_empty_and_refuses_to_overwrite(tmp_path, tiny_ckpt, capsys):
    out_json = tmp_path / "r.jsonl"
    bench.main(["--models", tiny_ckpt, *FAST, "--skip", "train,latency", "--json", str(out_json)])
    row = json.loads(out_json.read_text())
    assert row["eval_img_s"] > 0 and row["train_img_s"] is None and row["latency_ms_median"] is None
    assert bench.cli(["--models", tiny_ckpt, *FAST, "--json", str(out_json)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.cli
def test_vs_two_settings_prints_ratios(tiny_ckpt, capsys):
    summary = bench.main(["--vs", tiny_ckpt, "--vs_settings", "channels_last=0", "channels_last=1",
                          "--vs_mode", "train", *FAST, "--rounds", "3"])
    out = capsys.readouterr().out
    rounds = re.findall(r"^\| (\d) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rounds] == ["1", "2", "3"]
    assert [float(r[1]) for r in rounds] == pytest.approx(summary["ratios"], abs=1e-3)
    assert re.search(r"B/A median [\d.]+ \(min [\d.]+, max [\d.]+\) over 3 rounds", out)
    assert "channels_last=1" in summary["b"] and summary["ratio_min"] <= summary["ratio_median"]


@pytest.mark.cli
def test_backends_each_model_in_each_runtime(tmp_path, tiny_ckpt, capsys):
    rows = bench.main(["--models", tiny_ckpt, "resnet20", *FAST, "--backend", "eager", "onnxruntime",
                       "--skip", "latency"])
    assert [(r["model"], r["backend"]) for r in rows] == [
        (tiny_ckpt, "eager"), ("resnet20", "eager"), (tiny_ckpt, "onnxruntime"), ("resnet20", "onnxruntime")]
    ort = rows[2]
    assert ort["eval_img_s"] > 0 and ort["train_img_s"] is None       # no train step in ORT
    table = capsys.readouterr().out
    assert re.search(r"\| resnet20 \| onnxruntime \| .* \| [\d.]+x \| [\d.]+x \|", table)
    summary = bench.main(["--vs", tiny_ckpt, "--vs_settings", "backend=eager", "backend=onnxruntime",
                          *FAST, "--rounds", "2"])
    assert "backend=onnxruntime" in summary["b"] and len(summary["ratios"]) == 2
    # batch 1 (latency): the export still gets a dynamic batch axis
    summary = bench.main(["--vs", tiny_ckpt, "--vs_settings", "backend=eager", "backend=onnxruntime",
                          *FAST, "--batch_size", "1", "--vs_mode", "latency", "--rounds", "1"])
    assert summary["ratios"][0] > 0


@pytest.mark.cli
def test_int8_and_bf16_runtimes_time_a_tiny_model(tiny_ckpt, capsys):
    """onnxruntime-int8 quantizes the exported graph (its QDQ nodes are there) and times it;
    bf16 autocast runs in eager and both appear in the table."""
    rows = bench.main(["--models", tiny_ckpt, *FAST, "--backend", "onnxruntime-int8", "--skip", "latency"])
    assert rows[0]["backend"] == "onnxruntime-int8" and rows[0]["eval_img_s"] > 0
    assert rows[0]["train_img_s"] is None
    import onnx
    runner = bench.make_runner(bench.build(tiny_ckpt), bench.Settings("cpu", 32, 2, backend="onnxruntime-int8"), 10)
    ops = {n.op_type for n in onnx.load(runner.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul", "Conv"} <= ops
    summary = bench.main(["--vs", tiny_ckpt, "--vs_settings", "amp=none", "amp=bf16", *FAST, "--rounds", "1"])
    assert "amp=bf16" in summary["b"] and summary["ratios"][0] > 0
    assert "onnxruntime-int8" in capsys.readouterr().out


def test_a_graph_that_disagrees_with_pytorch_is_not_timed(tiny_ckpt, monkeypatch):
    from deploy import runners
    real = runners.graph_runner
    monkeypatch.setattr(runners, "graph_runner", lambda *a: (lambda images: real(*a)(images) + 1.0))
    with pytest.raises(UserError, match="onnxruntime disagrees with PyTorch"):
        bench.make_runner(bench.build(tiny_ckpt), bench.Settings("cpu", 32, 2, backend="onnxruntime"), 10)


@pytest.mark.cli
def test_vs_two_models(tiny_ckpt, capsys):
    summary = bench.main(["--vs", tiny_ckpt, "resnet18", *FAST, "--rounds", "2"])
    assert len(summary["ratios"]) == 2 and summary["mode"] == "eval"
    assert "B/A median" in capsys.readouterr().out


@pytest.mark.cli
@pytest.mark.parametrize("argv, message", [
    (["--models", "no_such_model"], "unknown model"),
    (["--vs", "resnet18"], "needs --vs_settings"),
    (["--models", "resnet18", "--amp", "fp16"], "needs a CUDA device"),
    (["--models", "resnet18", "--skip", "eval,colour"], "--skip: unknown colour"),
    (["--models", "timm_convnext:resnet18"], "only mirrors our standard ConvNeXt"),
    (["--models", "resnet18", "--json", "/missing/dir/x.json"], "its folder does not exist"),
    (["--models", "resnet18", "--input_size", "-5"], "--input_size must be at least 1"),
    (["--models", "resnet18", "--backend", "compile", "--compile"], "give --backend compile"),
    (["--models", "resnet18", "--backend", "onnxruntime", "--amp", "bf16"], "onnxruntime backend (the exported fp32 graph in ONNX Runtime) runs in fp32"),
    (["--models", "resnet18", "--backend", "onnxruntime-int8", "--channels_last"], "runs its own graph: no --channels_last"),
    (["--vs", "resnet18", "--vs_settings", "backend=onnxruntime", "", "--vs_mode", "train"],
     "no training step"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert bench.cli(FAST + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.e2e
def test_bad_model_name_cli_exit_2():
    res = _run("--models", "no_such_model", *FAST)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: unknown model 'no_such_model'")
    assert res.stdout == ""


@pytest.mark.cli
def test_bench_engine_alternates_and_reports_ratio(tiny_ckpt, capsys):
    from cli import bench_engine
    result = bench_engine.main(["--model", tiny_ckpt, "--input_size", "32", "--batch_size", "2",
                                "--steps", "3", "--rounds", "2", "--print_freq", "2",
                                "--model_ema"])
    out = capsys.readouterr().out
    assert len(result["ratios"]) == 2 and len(result["bare_img_s"]) == 2
    assert re.search(r"engine/bare median [\d.]+ \(min [\d.]+, max [\d.]+\) over 2 rounds", out)
    assert "target >= 0.90:" in out


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: scripts/gpu_check.sh runs for real")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [f"error: no CUDA GPU visible to torch ({sys.executable}): nothing to check"]


@pytest.mark.cli
def test_report_records_where_it_was_measured_and_is_not_overwritten(tmp_path, tiny_ckpt, capsys):
    """--report: the printed table in a markdown file whose first lines say which command, on
    which machine, with which versions, at which commit and date; an existing report is refused."""
    import platform
    from common.provenance import commit
    report = tmp_path / "speed.md"
    argv = ["--models", tiny_ckpt, *FAST, "--skip", "train,latency", "--report", str(report)]
    bench.main(argv)
    text = report.read_text()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert text.startswith("<!-- written by scripts/benchmark.py")
    assert "python scripts/benchmark.py --models" in text and f"Python {platform.python_version()}" in text
    assert f"torch {torch.__version__.split('+')[0]}" in text and f"commit {commit()}" in text
    assert all(line in text for line in printed) and len(printed) == 3
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        bench.main(argv)
