"""Parameter and MAC counts (MACs from torch's FlopCounterMode, one image)."""
import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, input_size=224, in_chans=3):
    """Multiply-accumulates of one forward pass on one image (FLOPs / 2, as papers report)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
