"""A model run under a runtime.Settings: eager or compiled PyTorch, or ONNX Runtime on its
exported fp32 graph or that graph's int8 quantization; eval, latency (batch 1) and train steps.
scripts/benchmark.py and bench_engine.py time these, the latency keep rule measures with them.
"""
import os
import tempfile
import time

import torch
import torch.nn as nn

from common.errors import UserError, first_line
from models.complexity import in_chans_of
from deploy.runtime import graph_runner, onnx_modules, quantize_int8

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # runtime.AMP's dtypes
DEFAULT_THREADS = torch.get_num_threads()
OPSET = 18


def export_onnx(model, example, path, dynamic_size=False):
    """torch's exporter (torch.export based, opset 18) to `path`, with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    shape = {0: batch}
    if dynamic_size:
        shape.update({2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)})
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=(shape,), verbose=False)
        program.save(path)
    except Exception as e:  # the exporter's own errors come from many modules
        raise UserError(f"ONNX export failed ({type(e).__name__}: {first_line(e)})") from None


def backward_step(loss, optimizer, scaler=None):
    """loss.backward() and the optimizer step, through the textbook GradScaler steps in fp16."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class Runner:
    """One model under one Settings, ready to run eval, latency (batch 1) or train steps."""

    def __init__(self, model, settings, num_classes):
        s = self.settings = settings
        self.device = torch.device(s.device)
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        if s.compile or s.runtime.compiles:
            try:
                self.model = torch.compile(self.model, dynamic=False)
            except Exception as e:  # e.g. a Python version this torch cannot compile for
                raise UserError(f"torch.compile is unsupported here: {first_line(e)}") from None
        size, chans = s.input_size, in_chans_of(model)

        def images(n):
            return torch.randn(n, chans, size, size, device=self.device).to(memory_format=fmt)
        self.inputs = {"eval": images(s.batch_size), "latency": images(1),
                       "train": images(s.batch_size)}
        self.targets = torch.randint(0, num_classes, (s.batch_size,), device=self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = None  # made on the first train step: eval-only runs need no state
        self.scaler = torch.amp.GradScaler("cuda") if s.amp == "fp16" else None

    def autocast(self):
        dtype = AMP_DTYPES[self.settings.amp]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def images_per_step(self, mode):
        return 1 if mode == "latency" else self.settings.batch_size

    def enter(self, mode):
        """Set train/eval mode and the thread count before steps of `mode`."""
        torch.set_num_threads(self.settings.threads or DEFAULT_THREADS)  # sides may differ
        self.model.train(mode == "train")
        if mode == "train" and self.optimizer is None:
            # a tiny lr: random data must not drive the weights anywhere odd
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)

    def step(self, mode):
        if mode == "train":
            return self._train_step()
        with torch.inference_mode(), self.autocast():
            self.model(self.inputs[mode])

    def _train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.criterion(self.model(self.inputs["train"]).float(), self.targets)
        backward_step(loss, self.optimizer, self.scaler)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, mode, steps):
        """Untimed steps; the first one compiles under --compile, so its failure is explained."""
        self.enter(mode)
        compiled = self.settings.compile or self.settings.runtime.compiles
        for i in range(max(steps, 1 if compiled else 0)):
            try:
                self.step(mode)
            except Exception as e:
                if not compiled or i:
                    raise
                raise UserError(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); "
                                f"run without --compile") from None
        self.sync()

    def time(self, mode, iters, min_time):
        """Seconds of each timed step: at least `iters` steps and at least `min_time` seconds."""
        self.enter(mode)
        times, start = [], time.perf_counter()
        while len(times) < iters or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            self.step(mode)
            self.sync()
            times.append(time.perf_counter() - t0)
        return times


class GraphRunner(Runner):
    """The same steps on the exported graph (dynamic batch) in ONNX Runtime on the CPU with the
    torch thread count. The fp32 graph must give PyTorch's logits on the eval batch (1e-4 of
    the largest |logit| above 1), else it is refused."""

    def __init__(self, model, settings, num_classes):
        super().__init__(model, settings, num_classes)
        self._folder = tempfile.TemporaryDirectory()
        path = os.path.join(self._folder.name, "model.onnx")
        # two example images even at batch 1: torch.export fixes a batch axis of size 1
        example = self.inputs["eval"][:1].expand(2, -1, -1, -1).contiguous()
        onnx_modules()
        export_onnx(self.model.eval(), example, path)
        self.arrays = {k: v.numpy() for k, v in self.inputs.items()}
        self.path = self.prepare(path)
        self.run_graph = graph_runner(self.path, settings.threads or DEFAULT_THREADS)
        self.check(self.run_graph)

    def prepare(self, path):
        """The graph file to run (here the fp32 graph as exported)."""
        return path

    def check(self, run):
        """The fp32 graph must give PyTorch's logits."""
        with torch.inference_mode():
            ref = self.model(self.inputs["eval"]).float().numpy()
        diff, scale = float(abs(run(self.arrays["eval"]) - ref).max()), float(abs(ref).max())
        if diff > 1e-4 * max(1.0, scale):
            raise UserError(f"{self.settings.backend} disagrees with PyTorch on this model (max |logit "
                            f"difference| {diff:.3g}, largest |logit| {scale:.3g}): not timed")

    def enter(self, mode):
        if mode == "train":
            raise UserError(f"the {self.settings.backend} backend has no training step")

    def step(self, mode):
        self.run_graph(self.arrays[mode])


class Int8GraphRunner(GraphRunner):
    """The fp32 graph's int8 quantization, calibrated on random images (speed only:
    scripts/export.py --quantize int8 calibrates on training images and reports the accuracy)."""

    def prepare(self, path):
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(tuple(self.inputs["eval"].shape), generator=generator).numpy() for _ in range(2)]
        quantize_int8(path, path + ".int8", batches)
        return path + ".int8"

    def check(self, run):
        pass  # int8 logits differ from fp32 by design; export.py measures the accuracy


def make_runner(model, settings, num_classes):
    """The settings' runtime's runner for `model`."""
    return settings.runtime.runner_class()(model, settings, num_classes)
