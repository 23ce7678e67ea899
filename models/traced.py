"""The `traced` family: any model, its channel groups read off a recorded forward (graph.py).

Its `arch` records how the model is built and what pruning changed, never code:

    {"family": "traced", "builder": {"kind": "timm" | "torchvision" | "arch" | "module", ...},
     "shapes": {key: shape of every tensor whose shape differs from what the builder makes},
     "head": the classifier weight's key, "num_classes", "in_chans", "input_size"}

A timm or torchvision model is rebuilt from that alone (on the meta device, each tensor
resized to its recorded shape, then the weights loaded); a model of the user's own class
(`module`) needs an instance of it (`pruning.load(path, model=...)`; in the process that
pruned it, a copy is kept). Unlike the declared families, its models are not instances of
this class: it only builds them and reads their groups.
"""
import contextlib
import copy
import functools
import inspect
import json
import uuid
import warnings

import torch
import torch.nn as nn

from common.errors import UserError, first_line

from .family import Family
from .graph import ForwardFailed, analyse, module_names
from .registry import register_family
from .weights import with_own_metadata

_TEMPLATES = {}  # builder token -> a copy of a model of the user's own class (this process only)
BUILDER_KINDS = ("timm", "torchvision", "arch", "module")
TORCHVISION = "torchvision:"  # --model torchvision:NAME


def _torchvision_names():
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


@contextlib.contextmanager
def _weights_on_meta():
    """Build with every parameter and buffer on the meta device while the rest of the
    constructor runs on the CPU (torchvision's RegNet computes its widths with tensors)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor.to("meta") if tensor is not None else None, persistent)
    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build(builder, **kwargs):
    """The model a builder describes, as its library makes it (on the current default device;
    on the meta device, only its tensors are)."""
    kind, name = builder.get("kind"), builder.get("name")
    on_meta = torch.get_default_device().type == "meta"
    with warnings.catch_warnings(), (_weights_on_meta() if on_meta and kind in ("timm", "torchvision")
                                     else contextlib.nullcontext()):
        warnings.simplefilter("ignore")  # torchvision's notes on initialisation defaults
        if kind == "timm":
            return timm_factory(name)(pretrained=False, **builder.get("kwargs", {}), **kwargs)
        if kind == "torchvision":
            if name not in _torchvision_names():
                raise UserError(f"torchvision has no classification model {name!r}")
            import torchvision
            return torchvision.models.get_model(name, weights=None, **builder.get("kwargs", {}), **kwargs)
    if kind == "arch":  # a shape of a declared family, traced (the cross-check)
        from . import build_model
        return build_model(builder["arch"], **kwargs)
    if kind == "module":
        template = _TEMPLATES.get(builder.get("token"))
        if template is None:
            raise UserError(f"this model is a {builder.get('class')} of your own: rebuild it with "
                            "pruning.load(path, model=a_fresh_instance)")
        model = copy.deepcopy(template)
        return model.to("meta") if torch.get_default_device().type == "meta" else model
    raise UserError(f"unknown model builder {kind!r}; known: {', '.join(BUILDER_KINDS)}")


def timm_factory(name):
    """timm's own factory of `name` (ours replace timm's convnext_tiny..xlarge in its registry)."""
    from .registry import OUR_MODELS, _timm
    timm = _timm()
    if name in OUR_MODELS:
        own = getattr(timm.models.convnext, name, None)
        if own is None:
            raise UserError(f"timm has no own model {name!r}")
        return own
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}")
    return lambda **kwargs: timm.create_model(name, **kwargs)


def _fit_attributes(module, depthwise):
    """A module's size attributes after its tensors were resized."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        else:
            if depthwise:
                module.groups = w.shape[0]
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (w if w is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.LayerNorm) and w is not None:
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.GroupNorm) and w is not None:
        if module.num_groups == module.num_channels:
            module.num_groups = w.shape[0]
        module.num_channels = w.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = w.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = w.shape[1]


def resize(model, shapes):
    """Give each named tensor its recorded shape (in place; resized modules get a fresh init
    off the meta device, the weights loaded after overwrite it). Returns the model."""
    touched = {}
    own = model.state_dict(keep_vars=True)
    for key, shape in shapes.items():
        if key not in own:
            raise UserError(f"the model has no tensor {key}, which the file resizes")
        path, _, attr = key.rpartition(".")
        module = model.get_submodule(path)
        if module not in touched:
            touched[module] = (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
                               and module.groups == module.in_channels == module.out_channels)
        old = own[key]
        new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
    for module, depthwise in touched.items():
        _fit_attributes(module, depthwise)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and next(iter(module.parameters()), torch.empty(0)).device.type != "meta":
            reset()
    return model


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def builder_of_name(name):
    """The builder a --model name means: `torchvision:NAME`, a stock timm name; else None."""
    from .registry import base_name, is_stock_timm
    if isinstance(name, str) and name.startswith(TORCHVISION):
        if name[len(TORCHVISION):] not in _torchvision_names():
            raise UserError(f"--model {name}: torchvision has no classification model {name[len(TORCHVISION):]!r}")
        return {"kind": "torchvision", "name": name[len(TORCHVISION):]}
    if isinstance(name, str) and is_stock_timm(name):
        return {"kind": "timm", "name": base_name(name)}
    return None


def arch_of_weights(builder, state_dict, input_size):
    """The traced arch of weights for a builder's model (every key theirs, shapes recorded)."""
    with torch.device("meta"):
        model = build(builder)
    base = _shapes(model)
    missing, extra = [k for k in base if k not in state_dict], [k for k in state_dict if k not in base]
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise UserError(f"the weights do not fit {describe(builder)}: {what}"
                        + (f" (+{len(missing or extra) - 3} more)" if len(missing or extra) > 3 else ""))
    shapes = {k: list(v.shape) for k, v in state_dict.items() if tuple(v.shape) != base[k]}
    from .complexity import in_chans_of
    resize(model, shapes)
    arch = {"family": "traced", "builder": builder, "shapes": shapes, "in_chans": in_chans_of(model),
            "input_size": int(input_size)}
    with torch.no_grad():
        out = model(torch.empty(1, arch["in_chans"], input_size, input_size, device="meta"))
    arch["num_classes"] = int(out.shape[-1])
    arch["head"] = _head(arch, {k: list(v.shape) for k, v in state_dict.items()})
    return arch


def _candidates(model):
    """Builders that may make this model's class: ours by arch, timm's architecture,
    torchvision's names."""
    cls = type(model)
    if getattr(cls, "declared", False) and isinstance(getattr(model, "arch", None), dict):
        return [{"kind": "arch", "arch": dict(model.arch)}]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cls.__module__.startswith("timm.") and cfg.get("architecture"):
        return [{"kind": "timm", "name": cfg["architecture"]}]
    if cls.__module__.startswith("torchvision.models"):
        import torchvision
        names = []
        for name in _torchvision_names():
            ret = inspect.signature(torchvision.models.get_model_builder(name)).return_annotation
            if getattr(ret, "__name__", ret) == cls.__name__:
                names.append(name)
        return [{"kind": "torchvision", "name": n} for n in names]
    return []


def _example(in_chans, input_size, device="cpu"):
    return torch.randn(1, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(device)


def _rebuilds(model, builder, example):
    """The resized shapes when the builder remakes `model` exactly (same keys, same logits)."""
    try:
        with torch.device("meta"):
            fresh = build(builder)
    except Exception:  # noqa: BLE001  (a builder that cannot make it is just not this model's)
        return None
    own, base = _shapes(model), _shapes(fresh)
    if set(own) != set(base):
        return None
    shapes = {k: list(s) for k, s in own.items() if base[k] != s}
    resize(fresh, shapes)
    fresh.load_state_dict(model.state_dict(), assign=True)  # the live tensors, not copies
    if any(t.device.type == "meta" for t in fresh.buffers()):  # non-persistent buffers: build for real
        fresh = resize(build(builder), shapes).to(example.device)
        fresh.load_state_dict(with_own_metadata(fresh, model.state_dict()))
    was_training = model.training
    try:
        with torch.no_grad():
            a, b = model.eval()(example), fresh.eval()(example)
    except Exception:  # noqa: BLE001  (a sibling shape the weights do not fit, e.g. grouped convs)
        return None
    finally:
        model.train(was_training)
    same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
        a, b, rtol=1e-4, atol=1e-5)
    return shapes if same else None


def _head(arch, shapes):
    """The classifier: the last conv / Linear called whose rows are the logits."""
    heads = [k for k in analysis(arch).producers if k in shapes and shapes[k][0] == arch["num_classes"]]
    return heads[-1] if heads else None


def arch_of_model(model, input_size):
    """The traced arch of a live model (its builder found, or `module` with a kept copy).

    Args:
        model: any nn.Module taking [N, C, H, W] images.
        input_size: the example input's side.
    """
    from .complexity import in_chans_of
    in_chans = in_chans_of(model)
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = _example(in_chans, input_size, device)
    where, was_training = ["the model"], model.training
    handles = module_names(model, where)
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as e:  # noqa: BLE001  (the user's model: any failure is theirs to read)
        raise UserError(f"{type(model).__name__} does not run on a {in_chans} x {input_size} x {input_size} "
                        f"input (in {where[-1]}): {type(e).__name__}: {first_line(e)}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(f"{type(model).__name__} returns {type(out).__name__} "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}: pruning needs a "
                        "classifier returning [batch, classes] logits")
    found = None
    for candidate in _candidates(model):
        shapes = _rebuilds(model, candidate, example)
        if shapes is not None and (found is None or len(shapes) < len(found[1])):
            found = (candidate, shapes)
            if not shapes:
                break
    if found is None:
        token = uuid.uuid4().hex
        _TEMPLATES[token] = copy.deepcopy(model).cpu()
        found = ({"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "token": token}, {})
    arch = {"family": "traced", "builder": found[0], "shapes": found[1], "num_classes": int(out.shape[1]),
            "in_chans": in_chans, "input_size": int(input_size)}
    arch["head"] = _head(arch, _shapes(model))
    return arch


def adopt_template(builder, model):
    """Register `model` (an instance of the builder's class) as its template; returns the builder."""
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if builder.get("class") != cls:
        raise UserError(f"the file holds a {builder.get('class')}, the model given is a {cls}")
    builder = {**builder, "token": uuid.uuid4().hex}
    _TEMPLATES[builder["token"]] = model
    return builder


@functools.lru_cache(maxsize=32)
def _analysis(arch_json):
    arch = json.loads(arch_json)
    example = torch.empty(1, arch["in_chans"], arch["input_size"], arch["input_size"], device="meta")
    try:
        with torch.device("meta"):
            model = Traced.from_arch(arch)
        return analyse(model, example)
    except UserError:
        raise
    except Exception:  # noqa: BLE001  (an op the meta device lacks: run it for real)
        model = Traced.from_arch(arch)
        return analyse(model, torch.zeros(example.shape))


def analysis(arch):
    """graph.Analysis of a traced arch (cached per shape)."""
    return _analysis(json.dumps(arch, sort_keys=True))


class NotAsPlanned(UserError):
    """The pruned shape does not run or does not keep its groups as planned; `module` is where
    (the module whose forward failed, or the group's first writer)."""

    def __init__(self, message, module):
        super().__init__(message)
        self.module = module


def check_pruned(source_arch, pruned_arch, keep):
    """Trace the pruned shape and refuse it unless every group came out as planned (its width
    the kept count, the same tensors): a size fixed in the model's code shows up here."""
    before = {g.name: g for g in analysis(source_arch).groups}
    what = describe(source_arch["builder"])
    try:
        after = analysis(pruned_arch)
    except ForwardFailed as e:  # the model's own code ran on the new shapes
        raise NotAsPlanned(f"the pruned {what} does not run ({first_line(e)[:200]}): a size fixed in its code",
                           e.module) from None
    found = {g.name: g for g in after.groups}
    for name, g in before.items():
        want = len(keep[name]) if name in keep else g.width
        got = found.get(name)
        if want == 1:  # one channel broadcasts like a size-1 dim: nothing to compare but that it runs
            continue
        same = got is not None and got.width == want and {(p.key, p.axis) for p in got.slices} == {
            (p.key, p.axis) for p in g.slices}
        if not same:
            made = f"{got.width} channels" if got is not None else after.whole.get(name, "no group")
            raise NotAsPlanned(f"the pruned {what} does not keep group {name} as planned ({want} channels, its "
                               f"code makes {made}): a size fixed in its code", name)


class Traced(Family):
    """Any model: built by its library (or from your instance), groups from the trace."""
    head_key = "fc"
    declared = False

    @classmethod
    def from_arch(cls, arch, drop_path_rate=0.0, layer_scale_init_value=None, head_init_scale=1.0):
        """The model, its tensors resized; `num_classes` other than the head's gives a fresh
        head (scaled by head_init_scale). layer_scale_init_value only initialises what the
        weights loaded next replace."""
        builder = arch["builder"]
        if drop_path_rate and builder.get("kind") != "timm":
            raise ValueError(f"--drop_path needs a timm model; {describe(builder)} has no drop path")
        model = build(builder, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
        shapes, own, head = dict(arch.get("shapes", {})), model.state_dict(), arch.get("head")
        fresh = []
        if head and arch.get("num_classes") is not None:
            for key in (head, head.rpartition(".")[0] + ".bias"):
                shape = list(shapes.get(key, own[key].shape)) if key in own else None
                if shape and shape[0] != arch["num_classes"]:
                    shape[0] = arch["num_classes"]
                    shapes[key] = shape
                    fresh.append(key)
        resize(model, shapes)
        if fresh and head_init_scale != 1.0:
            with torch.no_grad():
                for key in fresh:
                    t = model.get_parameter(key)
                    if t.device.type != "meta":
                        t.mul_(head_init_scale)
        model.arch = dict(arch)  # a plain attribute: what it was built from, for pruning it again
        return model.eval()

    @staticmethod
    def infer_arch(state_dict):
        return None  # a state dict alone never says how its model is built

    @classmethod
    def arch_after(cls, arch, state_dict):
        """The shapes that now differ from what the builder makes."""
        with torch.device("meta"):
            base = _shapes(build(arch["builder"]))
        shapes = {k: list(v.shape) for k, v in state_dict.items() if k in base and tuple(v.shape) != base[k]}
        return {**arch, "shapes": shapes}

    @staticmethod
    def channel_groups(arch):
        try:
            return list(analysis(arch).groups)
        except ForwardFailed as e:
            raise UserError(f"{describe(arch['builder'])} does not run on a {arch['input_size']} px input "
                            f"({first_line(e)[:200]})") from None

    @staticmethod
    def timm_export(arch, state_dict):
        """timm's own name when nothing but the classifier's class count changed."""
        head = arch.get("head")
        heads = {head, head.rpartition(".")[0] + ".bias"} if head else set()
        if arch["builder"].get("kind") != "timm" or not set(arch.get("shapes", {})) <= heads:
            return None
        return arch["builder"]["name"], {"num_classes": arch["num_classes"]}, dict(state_dict)

    @staticmethod
    def describe(arch):
        return f"{describe(arch['builder'])} (traced, {len(arch.get('shapes', {}))} tensors resized)"

    @staticmethod
    def widths(arch):
        groups = analysis(arch).groups
        return [("traced groups", f"{len(groups)}"), ("their channels", f"{sum(g.width for g in groups):,}")]

    @staticmethod
    def example_arch():
        return {"family": "traced", "builder": {"kind": "torchvision", "name": "resnet18"}, "shapes": {},
                "head": "fc.weight", "num_classes": 1000, "in_chans": 3, "input_size": 32}

    def fold(self):
        raise UserError("folding is for this toolkit's own families; a traced model runs as it was built")


def describe(builder):
    kind = builder.get("kind")
    if kind == "arch":
        return f"{builder['arch'].get('family')} (this toolkit's)"
    return f"your {builder.get('class')}" if kind == "module" else f"{kind} {builder.get('name')}"


register_family("traced", Traced)
