"""Channel groups of any model, read off one recorded forward pass (docs/design.md section 5b).

The forward runs under a TorchFunctionMode that sees every torch call at the highest level
(F.batch_norm, not what it calls), so Python control flow, type checks and shape arithmetic
simply run; nothing has to be traceable. Every dimension of every tensor gets a class in a
union-find; each call says which dimensions must keep the same channels (a conv ties its
input to its weight's columns, an add ties its operands, a norm its vector). A concatenation,
a slice or a flatten makes a derived class: segments (base class, channel range, block), so a
consumer's columns are cut at offsets. Whatever a call does that this module does not follow
(an unknown function, a reshape into heads, a grouped conv) keeps its channels whole, with the
reason, named by module. A group is a class that holds a producer (conv / Linear rows) and
is not kept whole; every parameter axis in it is one of its slices. (Long: one method per kind
of call, each a few lines; the union-find lives in channel_classes.py.)
"""
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .channel_classes import Classes, Segment
from .groups import Group, Part, Producer


@dataclass
class Analysis:
    """What the trace found: the groups, the channels kept whole (name -> reason), and the
    conv / Linear weights in call order."""
    groups: list
    whole: dict
    producers: list


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


_PASS = {"contiguous", "clone", "detach", "to", "float", "half", "double", "bfloat16", "type_as", "cpu", "cuda",
         "requires_grad_", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
         "feature_alpha_dropout", "softmax", "log_softmax", "_softmax", "relu", "relu_", "relu6", "gelu", "silu",
         "silu_", "sigmoid", "sigmoid_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh",
         "hardtanh_", "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "softplus",
         "glu_", "abs", "neg", "__neg__", "exp", "log", "sqrt", "rsqrt", "reciprocal", "square", "erf", "sign",
         "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "nan_to_num", "zero_", "fill_", "sin", "cos",
         "threshold", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "relu6_", "exp_", "mul_scalar"}
_BROADCAST = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
              "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
              "__itruediv__", "true_divide", "addcmul", "addcmul_", "addcdiv", "where", "maximum", "minimum", "pow",
              "__pow__", "__rpow__", "masked_fill", "masked_fill_", "lerp", "copy_", "expand", "expand_as",
              "broadcast_to", "eq", "ne", "lt", "gt", "le", "ge", "__eq__", "__lt__", "__gt__", "__and__", "__or__",
              "logical_and", "logical_or", "atan2", "fmod", "remainder", "floor_divide", "__floordiv__"}
_JOINS = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_SCALES = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "view_as",
          "reshape_as", "ravel"}
_KEEPS_ORIGIN = _VIEWS | {"permute", "transpose", "contiguous", "clone", "to", "float", "type_as"}
_REDUCE_DIM_ARG = {"norm": 2}  # positional index of `dim` where it is not 1
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nansum",
               "nanmean", "std_mean", "var_mean", "argmax", "argmin", "all", "any"}
_CREATE = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "zeros_like", "ones_like",
           "empty_like", "full_like", "rand", "randn", "rand_like", "randn_like", "linspace", "eye"}
_NON_TENSOR = {"size", "dim", "numel", "__get__", "_assert", "is_floating_point", "__len__", "item", "tolist"}


class Recorder(TorchFunctionMode):
    """Records the channel classes of one forward pass (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.c = Classes()
        self.dims = WeakIdKeyDictionary()  # tensor -> tuple of classes, one per dimension
        self.origin = WeakIdKeyDictionary()  # tensor -> ("w", weight key) or ("p", parameter key)
        self.keys = {}  # id(parameter) -> its state dict keys (tied weights have several)
        self.tensors = {}  # key -> the parameter or buffer
        self.params = {}  # key -> tuple of classes
        self.producers = []  # weight keys whose rows are outputs, in call order
        self.scale_of = {}  # weight key -> the 1-D parameter that multiplies its rows (layer scale)
        self.norms = []  # norm weight keys (scale factors)
        self.where = ["the model"]
        for key, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                self.keys.setdefault(id(t), []).append(key)
                self.tensors[key] = t
        for key, t in self.tensors.items():
            first = self.keys[id(t)][0]
            if first == key:
                self.params[key] = tuple(self.c.new(s) for s in t.shape)
                self.dims[t] = self.params[key]
                self.origin[t] = ("p", key)

    # -- what each call means ---------------------------------------------------------------
    def of(self, t):
        """The classes of a tensor; one made outside the forward is kept whole."""
        if t not in self.dims:
            self.dims[t] = tuple(self.c.fresh_whole(s, f"a tensor made outside the forward, in {self.where[-1]}")
                                 for s in t.shape)
        return self.dims[t]

    def new_dims(self, t):
        self.dims[t] = tuple(self.c.new(s) for s in t.shape)
        return self.dims[t]

    def unknown(self, name, args, kwargs, out):
        reason = f"{name} (not followed) in {self.where[-1]}"
        for t in _tensors(args) + _tensors(kwargs):
            for c in self.of(t):
                self.c.keep_whole(c, reason)
        for t in _tensors(out):
            self.dims[t] = tuple(self.c.fresh_whole(s, reason) for s in t.shape)

    def broadcast(self, inputs, out, join=False):
        od = self.of(out) if any(out is t for t in inputs) else self.new_dims(out)  # in place: its own dims
        for t in inputs:
            d = self.of(t)
            for i in range(1, min(len(d), len(od)) + 1):
                if t.shape[-i] == out.shape[-i] and out.shape[-i] > 1:
                    self.c.unify(d[-i], od[-i], join=join and self._activation(t))
        return od

    def _activation(self, t):
        return self.origin.get(t, ("a",))[0] != "p"

    def conv(self, args, kwargs, out, transposed):
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        groups = _arg(args, kwargs, 6, "groups", 1)
        xd, wd, od = self.of(x), self.of(w), self.new_dims(out)
        batched = x.dim() == w.dim()
        if batched:
            self.c.unify(xd[0], od[0])
        ci, co = xd[1 if batched else 0], od[1 if batched else 0]
        rows, cols = (wd[1], wd[0]) if transposed else (wd[0], wd[1])
        n_in = x.shape[1 if batched else 0]
        if groups == 1:
            self.c.unify(ci, cols)
            self.c.unify(co, rows)
        elif groups == n_in and w.shape[0] == n_in and out.shape[1 if batched else 0] == n_in:
            for c in (co, wd[0]):
                self.c.unify(ci, c)
        else:
            why = f"a grouped conv (groups={groups}) in {self.where[-1]}"
            for c in (ci, co, wd[0], wd[1]):
                self.c.keep_whole(c, why)
        if b is not None:
            self.c.unify(self.of(b)[0], co)
        for k in range(2 if batched else 1, x.dim()):  # positions a kernel slides over mix: never cut
            self.c.keep_whole(xd[k], f"a conv slides over it in {self.where[-1]}")
        if not transposed and self._key(w):
            self.producers.append(self._key(w))
        self.origin[out] = ("w", self._key(w))

    def _key(self, t):
        """The state dict key of a parameter (or a view of one), else None."""
        origin = self.origin.get(t)
        return origin[1] if origin and origin[0] == "p" else None

    def linear(self, args, kwargs, out):
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        xd, wd, od = self.of(x), self.of(w), self.new_dims(out)
        for i in range(len(xd) - 1):
            self.c.unify(xd[i], od[i])
        self.c.unify(xd[-1], wd[1])
        self.c.unify(od[-1], wd[0])
        if b is not None:
            self.c.unify(self.of(b)[0], od[-1])
        if self._key(w):
            self.producers.append(self._key(w))
        self.origin[out] = ("w", self._key(w))

    def norm(self, name, args, kwargs, out):
        x = args[0]
        xd = self.of(x)
        self.dims[out] = xd
        if self.origin.get(x, ("a",))[0] == "p":  # a weight standardised per row: still that weight
            self.origin[out] = self.origin[x]
        if name in ("batch_norm", "instance_norm"):
            vectors = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"),
                                                             (3, "weight"), (4, "bias"))]
            channel, weight = xd[1], vectors[2]
        elif name == "group_norm":
            groups, weight = _arg(args, kwargs, 1, "num_groups"), _arg(args, kwargs, 2, "weight")
            vectors, channel = [weight, _arg(args, kwargs, 3, "bias")], xd[1]
            if groups not in (1, x.shape[1]):
                self.c.keep_whole(channel, f"a GroupNorm of {groups} groups in {self.where[-1]}")
        else:  # layer_norm, rms_norm: over the last len(normalized_shape) dims
            shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
            weight = _arg(args, kwargs, 2, "weight")
            vectors = [weight, _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None]
            if len(shape) != 1:
                for c in xd[-len(shape):]:
                    self.c.keep_whole(c, f"a {name} over {len(shape)} dims in {self.where[-1]}")
            channel = xd[-1]
        if weight is None and (name != "batch_norm" or vectors[0] is None):
            self.c.keep_whole(channel, f"a {name} without per-channel tensors in {self.where[-1]}")
        for v in vectors:
            if v is not None:
                self.c.unify(self.of(v)[-1] if name in ("layer_norm", "rms_norm") else self.of(v)[0], channel)
        if weight is not None and self._key(weight):
            self.norms.append(self._key(weight))

    def reshape(self, x, out):
        """Dimensions kept, merged channel-first into blocks, or split (kept whole)."""
        xd, od = self.of(x), self.new_dims(out)
        xs, os_ = [(i, s) for i, s in enumerate(x.shape) if s != 1], [(j, s) for j, s in enumerate(out.shape) if s != 1]
        i = j = 0
        while i < len(xs) and j < len(os_):
            gi, gj = [xs[i]], [os_[j]]
            pi, pj = xs[i][1], os_[j][1]
            while pi != pj:
                if pi < pj and i + len(gi) < len(xs):
                    gi.append(xs[i + len(gi)])
                    pi *= gi[-1][1]
                elif pj < pi and j + len(gj) < len(os_):
                    gj.append(os_[j + len(gj)])
                    pj *= gj[-1][1]
                else:
                    break
            if pi != pj:
                break
            if len(gi) == 1 and len(gj) == 1:
                self.c.unify(xd[gi[0][0]], od[gj[0][0]])
            elif len(gj) == 1:  # merged: the first dim's channels each own a block of positions
                inner = pi // gi[0][1]
                merged = self.c.derived((Segment(xd[gi[0][0]], inner),))
                self.c.unify(merged, od[gj[0][0]])
                for k, _ in gi[1:]:
                    self.c.keep_whole(xd[k], f"merged behind another dim by a reshape in {self.where[-1]}")
            else:
                why = f"a reshape to {tuple(out.shape)} (split into heads or groups) in {self.where[-1]}"
                for k, _ in gi:
                    self.c.keep_whole(xd[k], why)
                for k, _ in gj:
                    self.c.keep_whole(od[k], why)
            i, j = i + len(gi), j + len(gj)
        if (i, j) != (len(xs), len(os_)):
            self.unknown("reshape", (x,), {}, out)

    def permute(self, name, args, kwargs, out):
        x = args[0]
        xd, n = self.of(x), x.dim()
        order = list(range(n))
        if name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (list, tuple)) \
                else args[1]
            order = [d % n for d in (kwargs.get("dims") or dims)]
        elif name in ("transpose", "swapaxes", "swapdims", "transpose_"):
            a, b = _arg(args, kwargs, 1, "dim0") % n, _arg(args, kwargs, 2, "dim1") % n
            order[a], order[b] = order[b], order[a]
        elif name == "t":
            order = order[::-1]
        elif name == "movedim":
            src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
            src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
            src, dst = [s % n for s in src], [d % n for d in dst]
            rest = [d for d in range(n) if d not in src]
            order = [None] * n
            for s, d in zip(src, dst):
                order[d] = s
            it = iter(rest)
            order = [o if o is not None else next(it) for o in order]
        self.dims[out] = tuple(xd[o] for o in order)

    def cat(self, args, kwargs, out):
        tensors = [t for t in _arg(args, kwargs, 0, "tensors") if isinstance(t, torch.Tensor)]
        dim = _arg(args, kwargs, 1, "dim", 0) % out.dim()
        od = list(self.new_dims(out))
        parts = [t for t in tensors if t.dim() == out.dim()]
        for t in parts:
            for k, c in enumerate(self.of(t)):
                if k != dim:
                    self.c.unify(c, od[k])
        segs = [Segment(self.of(t)[dim]) for t in parts if t.shape[dim] > 0]
        self.c.unify(self.c.derived(segs), od[dim])

    def split(self, name, args, kwargs, out):
        """Pieces along a channel dim stay whole: their bounds are constants in the code
        (split sizes, chunk counts), which a pruned model would still apply."""
        x = args[0]
        dim = _arg(args, kwargs, 2 if name != "unbind" else 1, "dim", 0) % x.dim()
        pieces = [t for t in out if isinstance(t, torch.Tensor)]
        xd = self.of(x)
        why = f"{name} along a channel dim (its sizes are constants in the code) in {self.where[-1]}"
        for t in pieces:
            td = self.new_dims(t)
            for k in range(x.dim()):
                if k != dim and t.dim() == x.dim():
                    self.c.unify(xd[k], td[k])
            if len(pieces) == 1 and t.shape == x.shape:
                self.c.unify(xd[dim], td[dim])
            else:
                self.c.keep_whole(td[dim] if t.dim() == x.dim() else xd[dim], why)
        if len(pieces) != 1:
            self.c.keep_whole(xd[dim], why)

    def getitem(self, x, index, out):
        index = index if isinstance(index, tuple) else (index,)
        if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in index):
            return self.unknown("indexing with tensors", (x,), {}, out)
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (x.dim() - n_real) + index[k + 1:]
        index = index + (slice(None),) * (x.dim() - sum(1 for i in index if i is not None))
        xd, od = self.of(x), self.new_dims(out)
        k = j = 0
        for i in index:
            if i is None:
                j += 1
                continue
            if isinstance(i, int):
                if x.shape[k] > 1:
                    self.c.keep_whole(xd[k], f"one channel indexed in {self.where[-1]}")
                k += 1
                continue
            if i.indices(x.shape[k]) == (0, x.shape[k], 1):
                self.c.unify(xd[k], od[j])
            else:  # its bounds are constants in the code: a pruned model would still apply them
                why = f"a slice [{i.start}:{i.stop}] of a channel dim in {self.where[-1]}"
                self.c.keep_whole(xd[k], why)
                self.c.keep_whole(od[j], why)
            k, j = k + 1, j + 1

    def reduce(self, name, args, kwargs, out):
        x = args[0]
        dim = _arg(args, kwargs, _REDUCE_DIM_ARG.get(name, 1), "dim")
        if isinstance(dim, torch.Tensor) or (dim is not None and not isinstance(dim, (int, list, tuple))):
            return self.unknown(name, args, kwargs, out)
        xd = self.of(x)
        dims = set(range(x.dim())) if dim is None else {d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)}
        kept = [k for k in range(x.dim()) if k not in dims]
        for t in _tensors(out):
            td = self.new_dims(t)
            if t.dim() == x.dim():
                for k in kept:
                    self.c.unify(xd[k], td[k])
            elif t.dim() == len(kept):
                for a, k in zip(td, kept):
                    self.c.unify(xd[k], a)

    def pool(self, name, x, out):
        spatial = int(name[-2]) if name[-2:-1].isdigit() else 2
        xd = self.of(x)
        for t in _tensors(out):
            td = self.new_dims(t)
            for k in range(x.dim() - spatial):
                self.c.unify(xd[k], td[k])

    def matmul(self, a, b, out):
        ad, bd, od = self.of(a), self.of(b), self.new_dims(out)
        if a.dim() < 2 or b.dim() < 2:
            return self.unknown("matmul of a vector", (a, b), {}, out)
        self.c.unify(ad[-1], bd[-2])
        self.c.unify(ad[-2], od[-2])
        self.c.unify(bd[-1], od[-1])
        for t, d in ((a, ad), (b, bd)):
            for i in range(3, min(t.dim(), out.dim()) + 1):
                if t.shape[-i] == out.shape[-i] > 1:
                    self.c.unify(d[-i], od[-i])

    def pad(self, args, kwargs, out):
        x, pad = args[0], list(_arg(args, kwargs, 1, "pad"))
        xd, od = self.of(x), self.new_dims(out)
        for k in range(x.dim()):
            back = x.dim() - 1 - k
            widths = pad[2 * back:2 * back + 2] if 2 * back < len(pad) else [0, 0]
            if any(widths):
                self.c.keep_whole(xd[k], f"padding in {self.where[-1]}")
                self.c.keep_whole(od[k], f"padding in {self.where[-1]}")
            else:
                self.c.unify(xd[k], od[k])

    def roll(self, name, args, kwargs, out):
        x = args[0]
        moved = _arg(args, kwargs, 2 if name == "roll" else 1, "dims")
        moved = [moved] if isinstance(moved, int) else list(moved if moved is not None else range(x.dim()))
        moved = {d % x.dim() for d in moved}
        xd, od = self.of(x), self.new_dims(out)
        for k in range(x.dim()):
            if k in moved:
                self.c.keep_whole(xd[k], f"{name} in {self.where[-1]}")
                self.c.keep_whole(od[k], f"{name} in {self.where[-1]}")
            else:
                self.c.unify(xd[k], od[k])

    def record(self, func, args, kwargs, out):
        name = getattr(func, "__name__", "")
        if name in _NON_TENSOR or not _tensors(out):
            return
        if name == "__setitem__":
            return self.unknown(name, args, kwargs, args[0])
        if name in _CREATE:
            for t in _tensors(out):
                self.new_dims(t)
            return
        tensors_in = _tensors(args) + _tensors(kwargs)
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            return self.conv(args, kwargs, out, "transpose" in name)
        if name == "linear":
            return self.linear(args, kwargs, out)
        if name in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"):
            return self.norm(name, args, kwargs, out)
        if name in _PASS and isinstance(out, torch.Tensor) and tensors_in and out.shape == tensors_in[0].shape:
            self.dims[out] = self.of(tensors_in[0])
            if name in _KEEPS_ORIGIN and tensors_in[0] in self.origin:
                self.origin[out] = self.origin[tensors_in[0]]
            return
        if name in _BROADCAST and isinstance(out, torch.Tensor):
            self._scale(name, tensors_in, out)
            return self.broadcast(tensors_in, out, join=name in _JOINS)
        if name in _VIEWS and isinstance(out, torch.Tensor):
            self.reshape(args[0], out)
            if args[0] in self.origin:
                self.origin[out] = self.origin[args[0]]
            return
        if name in ("permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "movedim"):
            self.permute(name, args, kwargs, out)
            if args[0] in self.origin:
                self.origin[out] = self.origin[args[0]]
            return
        if name in ("cat", "concat", "concatenate"):
            return self.cat(args, kwargs, out)
        if name in ("chunk", "split", "split_with_sizes", "tensor_split", "unbind"):
            return self.split(name, args, kwargs, out)
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if args[0] in self.origin and all(i is None or i is Ellipsis or i == slice(None) for i in index):
                self.origin[out] = self.origin[args[0]]  # a view that adds dims: still that tensor
            return self.getitem(args[0], args[1], out)
        if name in _REDUCTIONS:
            return self.reduce(name, args, kwargs, out)
        if "pool" in name or name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            return self.pool(name.replace("_with_indices", ""), args[0], out)
        if name in ("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"):
            return self.matmul(*(args[:2] if name != "__rmatmul__" else args[1::-1]), out)
        if name == "pad":
            return self.pad(args, kwargs, out)
        if name in ("roll", "flip"):  # positions move along some dims: the others carry through
            return self.roll(name, args, kwargs, out)
        if name == "prelu":
            xd, wd = self.of(args[0]), self.of(args[1])
            self.dims[out] = xd
            if args[1].numel() > 1:
                self.c.unify(wd[0], xd[1])
            return
        return self.unknown(name, args, kwargs, out)

    def _scale(self, name, tensors, out):
        """A 1-D parameter (via views) multiplying a conv / Linear output, or its weight before
        the call (the weight then still counts as that parameter): its layer scale."""
        if name not in _SCALES or len(tensors) != 2:
            return
        origins = [self.origin.get(t) for t in tensors]
        if not all(origins) or not all(o[1] for o in origins):
            return
        vectors = [o[1] for o in origins if o[0] == "p" and self.tensors[o[1]].dim() == 1]
        if {o[0] for o in origins} == {"w", "p"} and vectors:
            self.scale_of.setdefault(next(o[1] for o in origins if o[0] == "w"), vectors[0])
        elif {o[0] for o in origins} == {"p"} and len(vectors) == 1:
            weight = next(o[1] for o in origins if o[1] != vectors[0])
            if self.tensors[weight].dim() > 1:
                self.scale_of.setdefault(weight, vectors[0])
                self.origin[out] = ("p", weight)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out


class ForwardFailed(Exception):
    """The model's forward raised: `module` is the innermost module running ('' for the top)."""

    def __init__(self, module, label, error):
        super().__init__(f"in {label}: {type(error).__name__}: {error}")
        self.module, self.error = module, error


def module_names(model, where, paths=None):
    """Hooks keeping `where[-1]` the innermost module running (for the reasons' names), and
    `paths[-1]` its plain path."""
    handles = []
    for name, module in model.named_modules():
        label = f"{name} ({type(module).__name__})" if name else type(module).__name__

        def pre(mod, inputs, label=label, name=name):
            where.append(label)
            if paths is not None:
                paths.append(name)

        def post(mod, inputs, output):
            if len(where) > 1:
                where.pop()
            if paths is not None and len(paths) > 1:
                paths.pop()
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def analyse(model, example):
    """The channel groups of `model` (eval mode) on the example input, and what stays whole.

    Args:
        model: any nn.Module; its state dict keys name the groups' tensors.
        example: an input tensor (batch of one is enough; the meta device works).
    Returns:
        Analysis.
    Raises:
        ForwardFailed: naming the module whose forward raised.
    """
    rec, paths = Recorder(model), [""]
    handles = module_names(model, rec.where, paths)
    was_training = model.training
    model.eval()
    try:
        rec.dims[example] = tuple(rec.c.fresh_whole(s, "the model's input") for s in example.shape)
        with torch.no_grad(), rec:
            out = model(example)
    except Exception as e:  # noqa: BLE001  (the model's own code: which module failed is what matters)
        raise ForwardFailed(paths[-1], rec.where[-1], e) from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for t in _tensors(out):
        for c in rec.of(t):
            rec.c.keep_whole(c, "the model's output")
    return _groups(rec)


def _parts(rec, key, axis):
    """(base root, Part) for each segment of a parameter axis."""
    segs = rec.c.segments(rec.params[key][axis])
    if segs is None:
        return None
    out, offset = [], 0
    for s in segs:
        out.append((s.base, Part(key, axis, offset=offset, block=s.block)))
        offset += rec.c.size[s.base] * s.block
    return out


def _groups(rec):
    c = rec.c
    members = {}  # base root -> [Part], every parameter axis, aliases included
    broken = set()
    for key, dims in rec.params.items():
        for axis in range(len(dims)):
            parts = _parts(rec, key, axis)
            if parts is None:
                c.keep_whole(dims[axis], "a layout not followed")
                broken.add(c.find(dims[axis]))
                continue
            for alias in rec.keys[id(rec.tensors[key])]:
                for base, part in parts:
                    members.setdefault(base, []).append(Part(alias, axis, offset=part.offset, block=part.block))
    groups, whole, seen = [], {}, set()
    for wkey in dict.fromkeys(rec.producers):
        parts = _parts(rec, wkey, 0) if wkey in rec.params else None
        if not parts:
            continue
        base = parts[0][0]
        if base in seen:
            continue
        seen.add(base)
        name = wkey[:-len(".weight")] if wkey.endswith(".weight") else wkey
        if base in c.whole or base in broken:
            whole[name] = c.whole.get(base, "a layout not followed")
            continue
        group = _group(rec, base, name, members[base])
        if group.producers:
            groups.append(group)
        else:
            whole[name] = "no conv or Linear writes all its channels"
    return Analysis(groups, whole, list(dict.fromkeys(rec.producers)))


def _group(rec, base, name, slices):
    width = rec.c.size[base]
    rows = {p.key: p for p in slices if p.axis == 0 and p.offset == 0 and p.block == 1}
    producers = [Producer((rows[k],), rec.scale_of.get(k)) for k in dict.fromkeys(rec.producers) if k in rows
                 and rec.tensors[k].shape[0] == width]
    keys = {p.key for p in slices}
    scales = tuple(dict.fromkeys([k for k in rec.norms if k in keys and rec.tensors[k].dim() == 1]
                                 + [p.scale for p in producers if p.scale]))
    kind = "residual" if base in rec.c.joined else "conv"
    return Group(name=name, kind=kind, width=width, producers=tuple(producers), slices=tuple(slices),
                 scales=scales, stage=0)
