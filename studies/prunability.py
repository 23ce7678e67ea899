"""Which models the traced family prunes, and how well (scripts/prunability.py is its command
line): for each model, half the prunable channels cut with a criterion, then the forward, the
file reloaded without code, ONNX parity and the exactness check (the source with the cut
channels silenced gives the pruned model's logits; exact through BatchNorm networks).
"""
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import models
from common.errors import UserError, first_line
from models import traced
from pruning import api
from pruning.spec import KeepRules, PruneSpec
from pruning.surgery import silence

# The timm families the issue names (one small member each, plus ConvNeXt / V2 atto..base).
TIMM_MODELS = ("resnet18", "resnet50", "resnext26ts", "regnetx_002", "regnety_002", "efficientnet_b0",
               "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "convnext_atto",
               "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small",
               "convnext_base", "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano",
               "convnextv2_tiny", "convnextv2_small", "convnextv2_base", "densenet121", "vgg11_bn", "dla34",
               "ghostnet_100", "rexnet_100")


class Cnn14Like(nn.Module):
    """An audio CNN of the PANNs CNN14 kind (log-mel [N, 1, time, mel] in): BatchNorm over the
    mel bins, conv blocks of two 3x3 conv-BN-ReLU and a 2x2 average pool, mean over mel, max +
    mean over time, an fc-ReLU, the classifier. Widths are CNN14's halved twice."""

    def __init__(self, num_classes=527, mel_bins=64, widths=(16, 32, 64, 128, 256, 512)):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(mel_bins)
        blocks, prev = [], 1
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                        nn.AvgPool2d(2) if w != widths[-1] else nn.Identity()))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(prev, prev)
        self.fc_audioset = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.blocks(x).mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        return self.fc_audioset(torch.relu(self.fc1(x)))


@dataclass
class Row:
    """One model's outcome; figures None where the step did not run."""
    source: str
    name: str
    status: str = "pruned"  # pruned | refused | failed
    why: str = ""
    input_size: int = 0
    groups: int = 0
    whole: int = 0
    params: tuple = (None, None)
    macs: tuple = (None, None)
    forward: bool = False
    reload_diff: float | None = None
    onnx_diff: float | None = None
    exact_diff: float | None = None
    batchnorm: bool = False
    tracers: dict | None = None


def make(source, name):
    """A fresh model (random init from seed 0, eval mode) of a source: torchvision, timm or audio."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "torchvision":
            import torchvision
            return torchvision.models.get_model(name, weights=None).eval()
        if source == "timm":  # timm's own class, also for the names ours replace in its registry
            return traced.timm_factory(name)().eval()
        return Cnn14Like().eval()


def runs_at(model, size):
    x = torch.zeros(1, models.complexity.in_chans_of(model), size, size)
    try:
        with torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001  (any model's own failure means: not at this size)
        return False


def _max_diff(a, b):
    return float((a - b).abs().max())


def tracer_coverage(model, example):
    """Whether torch.fx's symbolic trace and torch.export take the model (for the note)."""
    out = {}
    for label, trace in (("fx", lambda: torch.fx.symbolic_trace(model)),
                         ("export", lambda: torch.export.export(model, (example,)))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trace()
            out[label] = "yes"
        except Exception as e:  # noqa: BLE001
            out[label] = f"no ({type(e).__name__})"
    return out


def check(source, name, input_sizes=(64, 224), criterion="opnorm", ratio=0.5, tracers=False, folder=None):
    """Prune one model and check the result (see the module docstring); returns a Row."""
    row = Row(source, name)
    try:
        model = make(source, name)
    except Exception as e:  # noqa: BLE001
        return _failed(row, "build", e)
    size = next((s for s in input_sizes if runs_at(model, s)), None)
    if size is None:
        row.status, row.why = "refused", f"does not run at {input_sizes}"
        return row
    row.input_size = size
    row.batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    example = torch.randn(2, models.complexity.in_chans_of(model), size, size,
                          generator=torch.Generator().manual_seed(0))
    if tracers:
        row.tracers = tracer_coverage(model, example[:1])
    try:
        result = api.prune(model, PruneSpec(criterion=criterion, rules=KeepRules(ratio=ratio), input_size=size,
                                            trace=True))
    except UserError as e:
        row.status, row.why = "refused", str(e)
        return row
    except Exception as e:  # noqa: BLE001
        return _failed(row, "prune", e)
    src, arch = result.source, result.arch
    row.groups, row.whole = len(src.groups), len([v for v in result.kept_whole.values() if v != "the model's output"])
    (p0, m0), (p1, m1) = models.count_arch(src.arch, size), models.count_arch(arch, size)
    row.params, row.macs = (p0, p1), (m0, m1)
    try:
        with torch.no_grad():
            logits = result.model(example)
        row.forward = True
        _reload(row, result, source, name, logits, example, folder)
        _onnx(row, result.model, logits, example, folder)
        dead = models.with_weights(src.arch, silence(src.sds["model"], src.groups, result.keep))
        with torch.no_grad():
            row.exact_diff = _max_diff(dead(example), logits)
    except Exception as e:  # noqa: BLE001
        return _failed(row, "check", e)
    return row


def _reload(row, result, source, name, logits, example, folder):
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, "pruned.safetensors")
        result.save(path)
        back = api.load(path, model=make(source, name) if source == "audio" else None)
        with torch.no_grad():
            row.reload_diff = _max_diff(back(example), logits)


def _onnx(row, model, logits, example, folder):
    from deploy.runners import export_onnx
    from deploy.runtime import ort_session
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, "pruned.onnx")
        try:
            export_onnx(model, example, path)
        except UserError as e:
            row.why = str(e)
            return
        out = ort_session(path).run(None, {"images": example.numpy()})[0]
        row.onnx_diff = _max_diff(torch.from_numpy(out), logits)


def _failed(row, step, e):
    row.status, row.why = "failed", f"{step}: {type(e).__name__}: {first_line(e)[:160]}"
    return row


def trace_cost(name, input_size=224, rounds=5):
    """Seconds of a whole opnorm prune (ratio 0.5) of one of our models, declared and traced,
    timed alternately in one process: ([declared], [traced]), one warm-up pair left out."""
    import time
    model = models.create_model(name).eval()
    times = ([], [])
    for r in range(rounds + 1):
        for trace in (False, True):
            start = time.perf_counter()
            api.prune(model, PruneSpec(rules=KeepRules(ratio=0.5), input_size=input_size, trace=trace))
            if r:
                times[trace].append(time.perf_counter() - start)
    return times


def torchvision_names(skip_largest=6):
    """torchvision's classification models, the `skip_largest` by parameter count left out."""
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    sizes = {}
    for n in names:
        with torch.device("meta"):
            sizes[n] = sum(p.numel() for p in traced.build({"kind": "torchvision", "name": n}).parameters())
    return sorted(names, key=sizes.get)[:len(names) - skip_largest]
