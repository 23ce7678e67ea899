"""The runtimes a model is deployed on: eager PyTorch, torch.compile (both with bf16 / fp16
autocast), ONNX Runtime on the fp32 graph and on its int8 quantization; their names, the
settings a model runs under, and the ONNX graph tools that need no PyTorch.

Importable without torch (the command lines' --help and flag checks read these names);
runners.py runs a model under a Settings, scripts/export.py writes the graphs.
"""
import importlib
import importlib.metadata
import math
import os
import tempfile
from dataclasses import dataclass

from common.errors import UserError
from common.registry import Registry

AMP = ("none", "bf16", "fp16")  # autocast dtypes of the PyTorch backends


@dataclass(frozen=True)
class Runtime:
    """A runtime a model is deployed on: a declared type, like pruning's Criterion.

    name: what --backend / --latency_backend take.
    runner: the class that runs a model under it, as "module:Class" (imported only when a
        model is run, so this module stays torch-free) or the class itself; it is built as
        runner(model, settings, num_classes) (deploy/runners.Runner's interface).
    devices / amps: the devices and autocast dtypes it runs in; anything else is refused.
    torch_options: --channels_last and --compile apply (PyTorch runs the model itself).
    compiles: the model is run through torch.compile.
    trains: it has a training step.
    packages: whose versions a measurement depends on (the latency cache's key).
    One `register_runtime(Runtime(...))` adds one: benchmark.py, prune.py's latency rule and
    the latency cache take its name from then on.
    """
    name: str
    summary: str
    runner: object = "deploy.runners:Runner"
    devices: tuple = ("cpu", "cuda")
    amps: tuple = AMP
    torch_options: bool = True
    compiles: bool = False
    trains: bool = True
    packages: tuple = ("torch",)

    def check(self, s):
        """Refuse settings this runtime cannot run (named by their flags), before any model is built."""
        if s.device.split(":")[0] not in self.devices:
            raise UserError(f"the {self.name} backend ({self.summary}) runs on {' / '.join(self.devices)}, "
                            f"not --device {s.device}")
        if s.amp not in self.amps:
            raise UserError(f"the {self.name} backend ({self.summary}) runs in {self.precisions()}: "
                            f"no --amp {s.amp}")
        if not self.torch_options and (s.channels_last or s.compile):
            raise UserError(f"the {self.name} backend runs its own graph: no --channels_last or --compile with it")

    def precisions(self):
        return " / ".join("fp32" if a == "none" else a for a in self.amps)

    def runner_class(self):
        if not isinstance(self.runner, str):
            return self.runner
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)

    def versions(self):
        """package -> installed version, for the packages a measurement depends on."""
        return {p: importlib.metadata.version(p) for p in self.packages}


RUNTIMES = Registry("runtime", Runtime)


def register_runtime(runtime, replace_existing=False):
    """Add a Runtime under its name (a second one of that name needs replace_existing); returns it."""
    return RUNTIMES.register(runtime, replace_existing)


def get_runtime(name):
    """The Runtime registered under `name` (one line naming the choices otherwise)."""
    if name not in RUNTIMES:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_names():
    return tuple(RUNTIMES)


# The exported graph run by ONNX Runtime, fp32 or its int8 quantization: CPU, no train step.
# (OpenVINO was measured on the same graphs and not offered: docs/deploy.md.)
_GRAPH = dict(runner="deploy.runners:GraphRunner", devices=("cpu",), amps=("none",), torch_options=False,
              trains=False, packages=("torch", "onnx", "onnxruntime"))
register_runtime(Runtime("eager", "PyTorch eager"))
register_runtime(Runtime("compile", "torch.compile", compiles=True))
register_runtime(Runtime("onnxruntime", "the exported fp32 graph in ONNX Runtime", **_GRAPH))
register_runtime(Runtime("onnxruntime-int8", "its static int8 quantization (QDQ) in ONNX Runtime",
                         **{**_GRAPH, "runner": "deploy.runners:Int8GraphRunner"}))


@dataclass(frozen=True)
class Settings:
    """How a model is run; `--vs_settings` overrides any field but device and input_size."""
    device: str
    input_size: int
    batch_size: int
    channels_last: bool = False
    amp: str = "none"
    compile: bool = False
    threads: int = 0  # 0: torch's default
    backend: str = "eager"

    @property
    def runtime(self):
        return get_runtime(self.backend)

    def describe(self):
        return (f"backend={self.backend},amp={self.amp},channels_last={int(self.channels_last)},"
                f"compile={int(self.compile)},"
                f"batch_size={self.batch_size}" + (f",threads={self.threads}" if self.threads else ""))


def check_settings(s):
    """Refuse settings this machine or the runtime cannot run, before any model is built."""
    if s.device.startswith("cuda") and not _cuda_available():
        raise UserError(f"--device {s.device}: CUDA is not available on this machine")
    if s.amp == "fp16" and not s.device.startswith("cuda"):
        raise UserError("--amp fp16 needs a CUDA device (GradScaler); use --amp bf16 on CPU")
    s.runtime.check(s)
    return s


def _cuda_available():
    import torch
    return torch.cuda.is_available()


# --- ONNX ---------------------------------------------------------------------------------

def onnx_modules():
    """onnx and onnxruntime, imported only where a graph is made or run (one line when missing)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"this needs the onnx and onnxruntime packages ({e}); "
                        "pip install -r requirements.txt") from None
    return onnx, onnxruntime


def quantize_int8(src, dst, batches):
    """ONNX Runtime static quantization of the fp32 graph `src` into `dst`: QDQ, int8 weights
    per output channel, uint8 activations calibrated (min-max) on `batches` (image arrays).

    MatMul / Gemm and the dense convs are quantized; depthwise convs stay fp32 (ONNX Runtime's
    int8 depthwise kernel was slower than its fp32 one here, so quantizing them cost speed).
    Returns the number of quantized and of fp32-kept nodes.
    """
    onnx, _ = onnx_modules()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"images": b} for b in batches)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(src, pre)  # shape inference and graph cleanup, as ORT recommends
        graph = onnx.load(pre).graph
        depthwise = [n.name for n in graph.node if n.op_type == "Conv"
                     and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        ops = ("Conv", "MatMul", "Gemm")
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(ops), nodes_to_exclude=depthwise)
        candidates = sum(n.op_type in ops for n in graph.node)
    return candidates - len(depthwise), len(depthwise)


def graph_runner(path, threads):
    """images array -> logits array, for the graph at `path` in ONNX Runtime on the CPU."""
    session = ort_session(path, threads)
    return lambda images: session.run(None, {"images": images})[0]


def ort_session(path, threads=0):
    """An ONNX Runtime CPU session with `threads` intra-op threads (0: its default)."""
    _, onnxruntime = onnx_modules()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def percentile(values, q):
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))  # 1-based: the smallest value with q% at or below
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def onnx_graph_sha256(model_proto):
    """The hash of an ONNX graph (operators and weights): stored in the file by scripts/export.py
    and checked by scripts/inference.py, so a damaged file is refused."""
    import hashlib
    return hashlib.sha256(model_proto.graph.SerializeToString(deterministic=True)).hexdigest()
