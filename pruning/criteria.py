"""Filter-importance criteria: `Criterion` objects in one registry, high score = keep.

A criterion is a score function over one tensor plus what it declares (docs/design.md
section 7): what it reads (`reads`: weight rows, per-channel scale factors, or a kind of
calibration evidence that pruning/calibration.py measures), whether it draws random numbers,
and its default aggregation. Everything else follows from those declarations: which options
apply (and so which are refused), whether calibration runs, what the checkpoint records.
Register your own from any code with `register_criterion(Criterion(...))`; prune.py, the
studies and `pruning.prune` then accept its name.

Every built-in score function takes a weight of shape [F, C, kh, kw] (a conv), [F, C] (a
Linear, read as K = 1) or, for `slimming`, a 1-D tensor of per-channel scale factors, and
returns F float64 scores on the CPU; a seeded one also takes `seed=`.

Operator norm (Singh & Plumbley), docs/design.md section 7. For each input channel c, with
A_c = W[:, c, :] (F x K) and mu_c its mean over the filters, let u1, v1 be the first singular
vectors of A_c - mu_c and d_c = sign(u1[0]) * v1, i.e. v1 oriented so that filter 0 projects
non-negatively onto it (the authors normalise row 0 of u1 v1^T). Then
t_f = sum_c <W[f, c] - mu_c, d_c> and score_f = t_f^2 / max_g t_g^2.

When filter 0 sits on the channel mean (|u1[0]| < ORIENT_TOL, u1 being a unit vector) its
sign says nothing. Taking +1 there (as the first design notes did) keeps whatever sign the SVD
library happened to return, so two correct implementations (numpy and torch, or the closed
form for K = 1) could disagree. We orient by the first filter that is off the mean instead:
d_c = sign(u1[j]) * v1 with j the first filter with |u1[j]| >= ORIENT_TOL. It equals the
authors' rule whenever theirs is defined, and it depends on the weights alone. A channel
whose filters are all equal contributes nothing either way.

Properties worth knowing:
- the orientation of every channel's direction is fixed by filter 0, so the scores depend on
  which filter comes first: reordering the filters can change them (W0, W1, W2 -> [1, 1, 0],
  but W2, W0, W1 -> [1, 0, 1] in the worked example of docs/design.md section 7);
- invariant to scaling all weights (by any non-zero factor), to adding one offset to every
  filter, and to permuting the input channels;
- never NaN: when every t_f is (numerically) zero, every score is 0; the keep rules then fall
  back on their tie rule (lower channel index wins).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.errors import UserError
from common.registry import Registry

from . import blocks

# torch and numpy are imported in the functions that use them: the command lines list the
# criteria in --help without loading either.

# |u1[0]| below this (u1 is a unit vector) means filter 0 sits on the channel mean.
ORIENT_TOL = 1e-9
# max|t| below this share of sum_c ||A_c||_F (bounded from above) is rounding noise: scores 0.
ZERO_TOL = 1e-12


def as_filters(weight):
    """View a producer weight as float64 [F, C, K] on the CPU.

    Args:
        weight: tensor of shape [F, C, kh, kw], [F, C, K] or [F, C].
    """
    import torch
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.dim() < 2:
        raise ValueError(f"a producer weight needs at least 2 dimensions, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1], -1)


def _finite(scores):
    """Scores of finite weights are finite; anything else means NaN / inf in the weight."""
    import torch
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("weight holds NaN or infinite values")
    return scores


def _normalise_t(t, floor):
    """score_f = t_f^2 / max t^2; all zeros when every |t_f| is below the rounding floor.

    Args:
        t: [F] float64 projections.
        floor: ZERO_TOL x sum_c (||A_c - mu_c||_F + sqrt(F) ||mu_c||), an upper bound of
            ZERO_TOL x sum_c ||A_c||_F computed from what the criterion already has.
    """
    import torch
    _finite(t)
    peak = float(t.abs().max())
    if peak <= floor or peak == 0.0:
        return torch.zeros_like(t)
    return (t / peak) ** 2


def _floor(centred_norms, mu, n_filters):
    """Rounding-noise floor from per-channel norms of the centred weights and of the means."""
    import torch
    mean_norms = torch.linalg.vector_norm(mu.reshape(mu.shape[-2], -1), dim=1)
    return ZERO_TOL * float(centred_norms.sum() + math.sqrt(n_filters) * mean_norms.sum())


def orientation(u0, u1_of):
    """+1 or -1 per channel: the sign of u1 at the first filter off the channel mean.

    Args:
        u0: [C] entry 0 of every channel's first left singular vector (a unit vector).
        u1_of: callable(mask) -> [n, F] full u1 of the masked channels; called only for the
            channels where filter 0 sits on the mean (|u0| < ORIENT_TOL), usually none.
    Returns:
        [C] float64 signs (+1 for a channel whose filters are all equal).
    """
    import torch
    sign = torch.where(u0 < 0, -1.0, 1.0).to(u0.dtype)
    on_mean = u0.abs() < ORIENT_TOL
    if bool(on_mean.any()):
        u1 = u1_of(on_mean)
        off = u1.abs() >= ORIENT_TOL
        first = off.to(torch.int8).argmax(dim=1)  # argmax returns the first maximal index
        pivot = u1.gather(1, first[:, None])[:, 0]
        sign[on_mean] = torch.where(off.any(dim=1) & (pivot < 0), -1.0, 1.0).to(u0.dtype)
    return sign


def opnorm(weight):
    """Operator-norm scores, vectorised: one batched SVD over channels and one contraction.

    Args:
        weight: producer weight [F, C, kh, kw] or [F, C].
    Returns:
        [F] float64 scores in [0, 1].
    """
    import torch
    w = as_filters(weight)
    mu = w.mean(dim=0, keepdim=True)            # [1, C, K] channel means over the filters
    x = w - mu                                  # centred, [F, C, K]
    if x.shape[2] == 1:
        # K = 1: the SVD of a column x is u1 = x / |x|, v1 = [1], so d_c = sign(x[0]) in closed
        # form; skipping thousands of tiny LAPACK calls is what makes Linear layers cheap.
        col = x[:, :, 0]                        # [F, C]
        norms = col.square().sum(dim=0).sqrt()  # (vector_norm over dim 0 is 5x slower)
        safe = norms.clamp_min(1e-300)
        u0 = col[0] / safe
        sign = orientation(u0, lambda m: (col[:, m] / safe[m]).T)
        d = sign[:, None]                       # [C, 1]
    else:
        # [F, C, K] -> [C, F, K]: one F x K matrix per input channel, all in one call.
        u, s, vh = torch.linalg.svd(x.permute(1, 0, 2), full_matrices=False)
        norms = torch.linalg.vector_norm(s, dim=1)  # ||x_c||_F from the singular values
        sign = orientation(u[:, 0, 0], lambda m: u[m, :, 0])
        d = sign[:, None] * vh[:, 0, :]         # [C, K] oriented directions
    t = torch.einsum("fck,ck->f", x, d)
    return _normalise_t(t, _floor(norms, mu[0], w.shape[0]))


def opnorm_abs(weight):
    """Operator norm without the orientation: t_f = sum_c |<W[f, c] - mu_c, v1_c>|, t / max t.

    `opnorm` orients each channel's direction by filter 0, so its scores depend on the filter
    order, and for a Linear layer (K = 1, d_c = sign of filter 0's entry) every score is the
    projection on filter 0's sign pattern: filter 0 always ranks first. Taking the absolute
    value of each projection removes both: the scores are invariant to reordering the filters
    (for K = 1 they are the L1 norms of the centred filters).

    Args:
        weight: producer weight [F, C, kh, kw] or [F, C].
    Returns:
        [F] float64 scores in [0, 1].
    """
    import torch
    w = as_filters(weight)
    mu = w.mean(dim=0, keepdim=True)
    x = w - mu
    if x.shape[2] == 1:
        t = x[:, :, 0].abs().sum(dim=1)
    else:
        _, _, vh = torch.linalg.svd(x.permute(1, 0, 2), full_matrices=False)
        t = torch.einsum("fck,ck->fc", x, vh[:, 0, :]).abs().sum(dim=1)
    _finite(t)
    peak = float(t.max())
    return t / peak if peak > 0 else torch.zeros_like(t)


def opnorm_loop(weight):
    """Operator-norm scores, the plain loop form (per channel SVD, per filter dot product).

    The reference the vectorised `opnorm` is tested and benchmarked against; numpy only.

    Args:
        weight: producer weight [F, C, kh, kw] or [F, C].
    Returns:
        [F] float64 scores in [0, 1].
    """
    import torch
    import numpy as np
    w = as_filters(weight)
    a = w.numpy()
    n_filters, n_channels, _ = a.shape
    t = np.zeros(n_filters)
    centred_norms, means = np.zeros(n_channels), np.zeros((n_channels, a.shape[2]))
    for c in range(n_channels):
        mu = a[:, c, :].mean(axis=0)
        u, s, vh = np.linalg.svd(a[:, c, :] - mu, full_matrices=False)
        centred_norms[c], means[c] = np.sqrt(np.sum(s ** 2)), mu
        sign = 1.0
        for f in range(n_filters):  # the first filter off the channel mean sets the sign
            if abs(u[f, 0]) >= ORIENT_TOL:
                sign = math.copysign(1.0, u[f, 0])
                break
        d = sign * vh[0]
        for f in range(n_filters):
            t[f] += float(np.dot(a[f, c, :] - mu, d))
    floor = _floor(torch.from_numpy(centred_norms), torch.from_numpy(means), n_filters)
    return _normalise_t(torch.from_numpy(t), floor)


def l1(weight):
    """L1 norm of each filter (Li et al.): sum |W[f]|.

    Args:
        weight: producer weight [F, ...].
    """
    w = as_filters(weight)
    return _finite(w.abs().sum(dim=(1, 2)))


def l2(weight):
    """L2 norm of each filter: ||W[f]||_2.

    Args:
        weight: producer weight [F, ...].
    """
    import torch
    w = as_filters(weight)
    return _finite(torch.linalg.vector_norm(w, dim=(1, 2)))


def fpgm(weight):
    """FPGM (He et al.): g_f = sum_i ||W[f] - W[i]||_2; filters near the others are redundant.

    Args:
        weight: producer weight [F, ...].
    """
    import torch
    w = as_filters(weight)
    flat = w.reshape(w.shape[0], -1)
    return _finite(torch.cdist(flat, flat).sum(dim=1))


def random(weight, seed=0):
    """Uniform random scores from a seeded generator: the control every pruning study needs.

    Args:
        weight: producer weight [F, ...] or scale factors [F]; only F is used.
        seed: generator seed; the same seed and F give the same scores.
    """
    import torch
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(int(weight.shape[0]), generator=gen, dtype=torch.float64)


def slimming(weight):
    """Network slimming (Liu et al.): |scale factor| of each channel.

    In ConvNeXt the LayerNorm weights and layer-scale gamma play the BatchNorm gamma's role,
    so the group scorer feeds this the group's 1-D scale factors, not a producer weight.

    Args:
        weight: 1-D tensor of per-channel scale factors.
    """
    import torch
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.dim() != 1:
        raise ValueError(f"slimming scores 1-D scale factors, got shape {tuple(w.shape)}")
    return _finite(w.abs())


def taylor(saliency):
    """First-order Taylor (Molchanov et al.): per channel, the sum of |w * dL/dw| over a slice.

    Fed the saliency tensors pruning/calibration.py measures on calibration batches, one per
    tensor slice of the group (weights and scale vectors), channels first.

    Args:
        saliency: [F, ...] non-negative |w * grad| of one slice.
    """
    w = as_filters(saliency)
    return _finite(w.sum(dim=(1, 2)))


def activation(mean_abs):
    """Mean |activation| of each channel at the input of a layer that reads the group.

    Args:
        mean_abs: [F] per-channel mean |input| measured on calibration batches.
    """
    import torch
    return _finite(torch.as_tensor(mean_abs).detach().to("cpu", torch.float64).reshape(-1))


# --------------------------------------------------------------------------- Criterion objects

SCOPES = ("producers", "group")             # what a weight criterion may read
NORMALIZATIONS = ("max", "mean", "none")
REDUCTIONS = ("mean", "sum", "max", "first")
# What a criterion reads -> the rows it yields (the recorded scope). The two evidence kinds
# are measured by pruning/calibration.py.
READS = {"weights": None, "scales": "scales", "saliency": "group", "activation": "inputs", "skip": "blocks"}
EVIDENCE = ("saliency", "activation", "skip")


@dataclass(frozen=True, kw_only=True)
class Aggregation:
    """How a group's score rows become one score per channel (docs/design.md section 6).

    Fields left None take the criterion's default.
    scope: which slices a weight criterion reads: "producers" (their rows) or "group" (every
        weight and scale slice the group cuts); criteria that read other things fix it.
    normalize: each row divided by its "max" or "mean", or "none" (raw, comparable across
        groups for one global threshold).
    reduce: how rows combine per channel: "mean", "sum", "max" or "first".
    """
    scope: str | None = None
    normalize: str | None = None
    reduce: str | None = None

    def __post_init__(self):
        for name, choices in (("scope", SCOPES + tuple(v for v in READS.values() if v)),
                              ("normalize", NORMALIZATIONS), ("reduce", REDUCTIONS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")

    def filled(self, default):
        """This aggregation with its None fields taken from `default`."""
        return Aggregation(**{k: getattr(self, k) if getattr(self, k) is not None else getattr(default, k)
                              for k in ("scope", "normalize", "reduce")})


BASE_AGGREGATION = Aggregation(scope="producers", normalize="max", reduce="mean")


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """One importance criterion.

    name: the name prune.py's --criterion and the studies use.
    score: callable(tensor[, seed=]) -> [F] float scores, high = keep (see the module doc for
        the tensors each `reads` kind passes).
    reads: "weights" (producer rows, or every slice with scope group), "scales" (the group's
        per-channel scale factors), or calibration evidence: "saliency" (|w * dL/dw| of every
        weight and scale slice of the group) or "activation" (mean |input| at every layer
        that reads the group's channels).
    seeded: the score function draws random numbers and takes `seed=`.
    uses_values: the scores depend on the weight values (False for random: only on shapes),
        so --raw_weights (the layer scale folded in or not) applies.
    aggregation: the default Aggregation (its scope is fixed unless reads == "weights").
    summary: one line for --help and the docs.
    block_score: callable(pruning.blocks.BlockView) -> float, one score per removable block
        (depth pruning), or None when the criterion does not score blocks. A criterion with
        `score=None` scores blocks only ("skip": the change when a block is skipped).
    """
    name: str
    score: Callable | None = field(repr=False)
    reads: str = "weights"
    seeded: bool = False
    uses_values: bool = True
    aggregation: Aggregation = BASE_AGGREGATION
    summary: str = ""
    block_score: Callable | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.score is None and self.block_score is None:
            raise ValueError(f"criterion {self.name}: give a score, a block_score or both")
        if self.reads not in READS:
            raise ValueError(f"criterion {self.name}: reads must be one of {', '.join(READS)}, not {self.reads!r}")
        fixed = READS[self.reads]
        scope = fixed or self.aggregation.scope or "producers"
        if fixed is None and scope not in SCOPES:
            raise ValueError(f"criterion {self.name}: a weight criterion's scope is one of {', '.join(SCOPES)}")
        object.__setattr__(self, "aggregation", replace(self.aggregation.filled(BASE_AGGREGATION), scope=scope))

    @property
    def evidence(self):
        """The calibration evidence it reads, or None for a data-free criterion."""
        return self.reads if self.reads in EVIDENCE else None

    @property
    def uses_seed(self):
        """Whether the seed changes its scores: its own draws, or the calibration images."""
        return self.seeded or self.evidence is not None

    def options(self):
        """The options that apply to this criterion (every other one is refused)."""
        applies = {"normalize", "reduce"} if self.score is not None else set()
        if self.reads == "weights" and self.score is not None:
            applies.add("scope")
            if self.uses_values:
                applies.add("raw_weights")
        if self.uses_seed:
            applies.add("seed")
        if self.evidence is not None:
            applies.add("calibration")
        return applies


CRITERIA = Registry("criterion", Criterion)


def register_criterion(criterion, replace_existing=False):
    """Add a Criterion to the registry prune.py, the studies and pruning.prune read (a second
    one of a taken name needs replace_existing); returns it."""
    return CRITERIA.register(criterion, replace_existing)


def get_criterion(criterion):
    """The Criterion registered under a name (a Criterion is returned as it is)."""
    if isinstance(criterion, Criterion):
        return criterion
    try:
        return CRITERIA[criterion]
    except (KeyError, TypeError):
        raise UserError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}") from None


# Defaults chosen from the DIGITS comparison over three dense ConvNeXt-T checkpoints
# (docs/studies.md): the whole group with mean-normalised rows and the max over rows raised
# opnorm's and fpgm's accuracy right after pruning at 13M and 3M on average; l1 and l2 did
# better with the producers alone.
_WHOLE_GROUP = Aggregation(scope="group", normalize="mean", reduce="max")
for _c in (
    Criterion(name="opnorm", score=opnorm, aggregation=_WHOLE_GROUP, block_score=blocks.branch_opnorm,
              summary="operator norm of each filter's projection (Singh & Plumbley)"),
    Criterion(name="opnorm_abs", score=opnorm_abs, block_score=blocks.branch_opnorm,
              summary="operator norm without the orientation"),
    Criterion(name="l1", score=l1, block_score=blocks.output_l1, summary="L1 norm of each filter (Li et al.)"),
    Criterion(name="l2", score=l2, block_score=blocks.output_l2, summary="L2 norm of each filter"),
    Criterion(name="fpgm", score=fpgm, aggregation=_WHOLE_GROUP, summary="geometric median distance (He et al.)"),
    Criterion(name="random", score=random, seeded=True, uses_values=False, block_score=blocks.random_block,
              summary="seeded uniform control"),
    Criterion(name="slimming", score=slimming, reads="scales", block_score=blocks.gain_slimming,
              summary="|scale factor| (Liu et al.)"),
    Criterion(name="taylor", score=taylor, reads="saliency", aggregation=Aggregation(normalize="mean", reduce="max"),
              block_score=blocks.taylor_branch, summary="first-order Taylor |w * dL/dw| (Molchanov et al.)"),
    Criterion(name="activation", score=activation, reads="activation", summary="mean |input| of the consumers"),
    Criterion(name="skip_logits", score=None, reads="skip", block_score=blocks.skip_logits,
              summary="blocks only: change of the logits when the block is skipped (calibration images)"),
    Criterion(name="skip_output", score=None, reads="skip", block_score=blocks.skip_output,
              summary="blocks only: change of the block's output when it is skipped (calibration images)"),
):
    register_criterion(_c)
