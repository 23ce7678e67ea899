"""Channel groups: which tensor slices must be cut together when pruning.

Plain data built from an `arch`; `pruning/` consumes it and never needs the model code.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """A slice of tensor `key` along `axis` that holds group channels [start, stop).

    The channels sit from position `offset` of that axis (a concatenation's later inputs), each
    owning `block` consecutive positions (a Linear after a flatten: a channel's H x W columns).
    """
    key: str
    axis: int
    start: int = 0
    stop: int | None = None  # None: up to the group width
    offset: int = 0
    block: int = 1


@dataclass(frozen=True)
class Producer:
    """Weights whose output filters (rows, axis 0 of each part) are scored for a group."""
    parts: tuple[Part, ...]  # together cover channels [0, width) in order
    scale: str | None = None  # 1-D per-row multiplier folded into the rows (layer scale)


@dataclass(frozen=True)
class Group:
    """Channels that share one kept-index set, e.g. a stage's residual stream.

    `kind` is the group's role: "residual" (a stage's stream, cut by --dims), "hidden" (an
    inner width of a block: a ConvNeXt MLP, a ResNet block's inner channels; cut by
    --hidden_ratio / --mlp_ratio) or "conv" (a plain conv's filters, VGG). `stage` is the
    index of the stage the group belongs to: per-stage rules read it.
    """
    name: str
    kind: str
    width: int
    producers: tuple[Producer, ...]
    slices: tuple[Part, ...]  # every tensor slice cut with this group's kept indices
    scales: tuple[str, ...] = ()  # per-channel scale factors (slimming criterion)
    stage: int = 0


def part_stop(part, width):
    """End of a part's channel range (None means the group width)."""
    return width if part.stop is None else part.stop


def part_span(part, width):
    """Positions of the part's axis its channels occupy: offset + (stop - start) x block."""
    return part.offset + (part_stop(part, width) - part.start) * part.block


def part_rows(tensor, part, width):
    """The part's slice of `tensor`, channels first ([channels, block, ...] for a block > 1)."""
    n = part_stop(part, width) - part.start
    t = tensor.narrow(part.axis, part.offset, n * part.block).movedim(part.axis, 0)
    return t.reshape(n, part.block, *t.shape[1:]) if part.block > 1 else t


def linear_parts(prefix, axis_in):
    """Parts of a Linear/Conv at `prefix` whose input (axis 1) or output (axis 0) is the group."""
    if axis_in:
        return (Part(f"{prefix}.weight", 1),)
    return Part(f"{prefix}.weight", 0), Part(f"{prefix}.bias", 0)


def norm_parts(prefix):
    return Part(f"{prefix}.weight", 0), Part(f"{prefix}.bias", 0)


def hidden_group(name, block, width, stage):
    """The MLP hidden channels of one ConvNeXt block (pwconv1 rows, pwconv2 columns)."""
    return Group(
        name=name, kind="hidden", width=width,
        producers=(Producer((Part(f"{block}.pwconv1.weight", 0),)),),
        slices=linear_parts(f"{block}.pwconv1", False) + linear_parts(f"{block}.pwconv2", True),
        stage=stage,
    )


def block_residual_parts(block, layer_scale, dw_parts):
    """What one block contributes to its residual group: (producers, slices, scales)."""
    gamma = f"{block}.gamma" if layer_scale else None
    producers = (Producer((Part(f"{block}.pwconv2.weight", 0),), scale=gamma),
                 Producer(tuple(p for p in dw_parts if p.key.endswith("weight"))))
    slices = (dw_parts + norm_parts(f"{block}.norm") + linear_parts(f"{block}.pwconv1", True)
              + linear_parts(f"{block}.pwconv2", False) + ((Part(gamma, 0),) if gamma else ()))
    scales = (f"{block}.norm.weight",) + ((gamma,) if gamma else ())
    return producers, slices, scales


@dataclass(frozen=True)
class Block:
    """A residual block whose branch can go, leaving the identity (depth pruning).

    Its tensors are `{name}.*`, with name = `{container}.{index}`: removing it drops them and
    renumbers the later blocks of its container.
    branch: the branch's layers after its last normalisation, in order, each a tuple of keys
        applied in parallel: what the operator-norm bound multiplies.
    gain: tensors that scale the branch output linearly (layer scale; the last BatchNorm's
        affine; a last Linear's weight and bias): zeroing them leaves the identity exactly.
    output: the weight whose rows write the branch output; scale: the per-row multiplier of
        those rows (layer scale or BatchNorm weight), None when there is none.
    """
    container: str
    index: int
    stage: int
    branch: tuple[tuple[str, ...], ...]
    gain: tuple[str, ...]
    output: str
    scale: str | None = None

    @property
    def name(self):
        return f"{self.container}.{self.index}"

    def owns(self, key):
        return key.startswith(self.name + ".")


def convnext_block(container, index, stage, layer_scale):
    """A ConvNeXt block (dwconv, norm, pwconv1, GELU, pwconv2, optional layer scale gamma)."""
    b = f"{container}.{index}"
    gamma = f"{b}.gamma" if layer_scale else None
    branch = ((f"{b}.norm.weight",), (f"{b}.pwconv1.weight",), (f"{b}.pwconv2.weight",)) + (((gamma,),) if gamma else ())
    gain = (gamma,) if gamma else (f"{b}.pwconv2.weight", f"{b}.pwconv2.bias")
    return Block(container, index, stage, branch, gain, f"{b}.pwconv2.weight", gamma)


def bn_block(container, index, stage, pre_activation):
    """A CIFAR ResNet block: conv1-bn1-relu-conv2-bn2 (bn2 scales the branch), or pre-activation
    bn1-relu-conv1-bn2-relu-conv2 (bn2 then ReLU: scaling bn2's affine scales the branch)."""
    b = f"{container}.{index}"
    branch = ((f"{b}.bn2.weight",), (f"{b}.conv2.weight",)) if pre_activation else ((f"{b}.bn2.weight",),)
    return Block(container, index, stage, branch, (f"{b}.bn2.weight", f"{b}.bn2.bias"), f"{b}.conv2.weight",
                 None if pre_activation else f"{b}.bn2.weight")
