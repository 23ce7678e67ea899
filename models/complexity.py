"""Parameter and MAC counts (MACs from torch's FlopCounterMode, one image; meta device is fine)."""
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def in_chans_of(model):
    """Input channels: the arch's, else the first conv's, else 3."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict) and "in_chans" in arch:
        return arch["in_chans"]
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def forward_cost(model, input_size, in_chans=None):
    """(MACs, output width) of one eval-mode forward pass on one image; MACs = FLOPs / 2."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans or in_chans_of(model), input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:  # FlopCounterMode's module tracker hooks tensors that need grad: none here
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            out = model(x)
    except RuntimeError as e:  # e.g. a feature map shrinks below a kernel
        raise UserError(f"cannot run this model at --input_size {input_size}: "
                        f"{str(e).splitlines()[0][:160]}") from None
    finally:
        model.train(was_training)
        for p, needed in grads:
            p.requires_grad_(needed)
    return counter.get_total_flops() // 2, out.shape[-1]


def smallest_input_size(model, upto=512):
    """The smallest square input side the model can run on (meta device: no real compute)."""
    def runs(size):
        try:
            forward_cost(model, size)
            return True
        except UserError:
            return False
    if not runs(upto):
        return None
    lo, hi = 0, upto  # runs(hi) holds; sizes that work form a suffix for these networks
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


def check_input_size(model, size, name="the model"):
    """UserError with the smallest workable size when the model cannot run at `size`."""
    try:
        forward_cost(model, size)
    except UserError:
        smallest = smallest_input_size(model)
        need = f"the smallest it takes is {smallest}" if smallest else "it fails even at 512"
        raise UserError(f"--input_size {size} is too small for {name}: {need}") from None


def count_macs(model, input_size=224, in_chans=None):
    """Multiply-accumulates of one forward pass on one image (as papers report them)."""
    return forward_cost(model, input_size, in_chans)[0]


def available_memory(device):
    """(bytes, where): a CUDA device's total memory, else the memory the system has available
    (Linux MemAvailable); (None, ...) when unknown."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "the available system memory"
    except (OSError, KeyError, ValueError):
        return None, "the system"


def check_memory(model, input_size, batch_size, training, device="cpu"):
    """Refuse a batch whose activations alone (a lower bound: the leaf modules' outputs,
    float32; all of them when training, the largest when not) exceed the device's memory,
    before any data is read (an out-of-memory kill says nothing)."""
    total, largest = activation_bytes(model, input_size)
    images = in_chans_of(model) * input_size * input_size * 4  # the batch itself, float32
    need = ((total if training else largest) + images) * batch_size
    have, where = available_memory(device)
    if have and need > have:
        raise UserError(f"--input_size {input_size} with a batch of {batch_size} needs at least "
                        f"{need / 2 ** 30:.1f} GiB for activations alone, more than the "
                        f"{have / 2 ** 30:.1f} GiB of {where}: lower the input size or the batch")


def activation_bytes(model, input_size, in_chans=None):
    """(sum, largest) bytes of the leaf modules' outputs of one image (float32, meta device is
    fine): a lower bound of what a training step (sum) or an evaluation (largest) holds."""
    device = next(model.parameters()).device
    sizes = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * 4)
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans or in_chans_of(model), input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)
