"""Criteria: the worked examples of docs/design.md section 7, invariances, degenerate inputs, loop parity."""
import math

import pytest
import torch

from pruning.criteria import (CRITERIA, fpgm, get_criterion, l1, l2, opnorm, opnorm_abs, opnorm_loop, random,
                              slimming)
from common.errors import UserError

BOTH = [opnorm, opnorm_loop]


def filters(*rows):
    """Filters as [F, C, K]: row i of each filter is channel i (the notation of docs/design.md)."""
    return torch.tensor(rows, dtype=torch.float64)


W0, W1, W2 = [[1, 0], [0, 1]], [[0, 0], [0, -2]], [[-1, 0], [0, 1]]
WORKED = [
    (filters([[2, 0], [0, 3]], [[0, 0], [0, 1]], [[1, 0], [0, -1]]), [1, 1 / 9, 4 / 9]),
    (filters([[2, 1], [3, -2]], [[1, 0], [1, 0]], [[-1, 3], [0, 1]]), [0.694444, 0.027778, 1]),
    (filters(W0, W1, W2), [1, 1, 0]),
    (filters(W2, W0, W1), [1, 0, 1]),  # the score depends on which filter comes first
    (torch.tensor([[3., 1], [0, 4], [-1, -1]]), [0.64, 1, 0.04]),  # K = 1
]


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("weight,expected", WORKED)
def test_design_worked_examples(fn, weight, expected):
    got = fn(weight)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_conv_shape_is_read_as_channels_by_kernel():
    w = torch.randn(8, 5, 3, 3)
    assert torch.equal(opnorm(w), opnorm(w.reshape(8, 5, 9)))


def random_weights(seed, shape=(12, 6, 3, 3)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 6, 3, 3), (16, 8), (7, 1, 7, 7), (5, 9, 2, 2), (3, 4, 4, 4)])
def test_vectorised_equals_loop(shape):
    for seed in range(3):
        w = random_weights(seed, shape)
        assert torch.allclose(opnorm(w), opnorm_loop(w), atol=1e-6, rtol=0)


def test_float32_input_matches_float64():
    w = random_weights(0).float()
    assert torch.allclose(opnorm(w), opnorm_loop(w.double()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fn", BOTH)
def test_invariant_to_scaling(fn):
    w = random_weights(1)
    for factor in (3.7, 1e-3, -2.0):
        assert torch.allclose(fn(w * factor), fn(w), atol=1e-9)


@pytest.mark.parametrize("fn", BOTH)
def test_invariant_to_common_offset(fn):
    w = random_weights(2)
    offset = random_weights(3, shape=(1,) + tuple(w.shape[1:])) * 5  # the same for every filter
    assert torch.allclose(fn(w + offset), fn(w), atol=1e-9)


@pytest.mark.parametrize("fn", BOTH)
def test_invariant_to_permuting_input_channels(fn):
    w = random_weights(4)
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fn(w[:, perm]), fn(w), atol=1e-9)


def test_deterministic():
    w = random_weights(5, (64, 32))
    assert torch.equal(opnorm(w), opnorm(w.clone()))


DEGENERATE = {
    "all-equal filters": torch.ones(6, 3, 2, 2) * 0.1,
    "zeros": torch.zeros(5, 4, 3, 3),
    "single filter": torch.randn(1, 4, 3, 3),
    "single filter linear": torch.randn(1, 4),
    "all-equal linear": torch.full((4, 3), 0.3),
    "one input channel": torch.randn(6, 1, 7, 7),
}


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_inputs_give_finite_scores(fn, name):
    scores = fn(DEGENERATE[name])
    assert scores.shape == (DEGENERATE[name].shape[0],)
    assert torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("fn", BOTH)
def test_all_equal_filters_score_zero(fn):
    assert torch.equal(fn(DEGENERATE["all-equal filters"]), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(fn(DEGENERATE["zeros"]), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("fn", BOTH)
def test_filter_zero_on_a_channel_mean(fn):
    # Channel 0: filter 0 = [0, 0] is the mean of [0,0], [1,2], [-1,-2]; filter 1 (the first off
    # the mean) orients it: contributions 0, +sqrt5, -sqrt5. Channel 1: 1, 0, -1 (filter 0 first).
    w = filters([[0, 0], [1, 0]], [[1, 2], [0, 0]], [[-1, -2], [-1, 0]])
    r5 = math.sqrt(5)
    t = torch.tensor([1, r5, -1 - r5], dtype=torch.float64)
    assert torch.allclose(fn(w), t ** 2 / (t ** 2).max(), atol=1e-9)
    # K = 1: channel 0 is [0, 1, -1] (filter 0 on the mean), channel 1 is [1, 0, -1].
    assert torch.allclose(fn(torch.tensor([[0., 1], [1, 0], [-1, -1]])),
                          torch.tensor([0.25, 0.25, 1], dtype=torch.float64), atol=1e-9)


def test_baselines():
    w = torch.tensor([[3., -4.], [1., 0.], [0., 0.]])
    assert l1(w).tolist() == [7, 1, 0]
    assert l2(w).tolist() == [5, 1, 0]
    d01, d02, d12 = math.sqrt(4 + 16), 5.0, 1.0
    assert torch.allclose(fpgm(w), torch.tensor([d01 + d02, d01 + d12, d02 + d12], dtype=torch.float64))
    assert slimming(torch.tensor([-2., 0.5])).tolist() == [2, 0.5]
    with pytest.raises(ValueError):
        slimming(w)


def test_random_is_seeded():
    w = torch.zeros(50, 3)
    assert torch.equal(random(w, seed=1), random(w, seed=1))
    assert not torch.equal(random(w, seed=1), random(w, seed=2))


def test_registry():
    assert set(CRITERIA) == {"opnorm", "opnorm_abs", "l1", "l2", "fpgm", "random", "slimming",
                             "taylor", "activation", "skip_logits", "skip_output"}
    assert get_criterion("l1").score is l1 and get_criterion(get_criterion("l1")) is get_criterion("l1")
    with pytest.raises(UserError, match="unknown criterion"):
        get_criterion("hrank")
    assert get_criterion("random").seeded and not get_criterion("random").uses_values
    assert get_criterion("taylor").evidence == "saliency" and get_criterion("taylor").uses_seed
    assert get_criterion("taylor").aggregation.scope == "group"  # what its rows really are


def test_opnorm_abs_does_not_favour_filter_0():
    # a Linear layer: opnorm projects every filter on filter 0's sign pattern, so the small
    # filter 0 ranks first and the two large ones far below it
    w = torch.tensor([[1., -1, 1, -1], [4, 4, -4, -4], [-4, 4, 4, -4], [-1, 1, -1, 1]])
    x = (w - w.mean(0)).double()
    t = x @ torch.sign(x[0])
    assert torch.allclose(opnorm(w), t ** 2 / (t ** 2).max())
    assert int(opnorm(w).argmax()) == 0
    got = opnorm_abs(w)
    centred = x.abs().sum(1)  # K = 1: the L1 norms of the centred filters
    assert torch.allclose(got, centred / centred.max())
    assert got.tolist() == [0.5, 1.0, 1.0, 0.5]


def test_opnorm_abs_ignores_filter_order():
    w = random_weights(5)
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(opnorm_abs(w)[perm], opnorm_abs(w[perm]), atol=1e-12)


@pytest.mark.parametrize("name", ["opnorm", "opnorm_abs", "l1", "l2", "fpgm"])
def test_non_finite_weights_are_refused(name):
    w = torch.randn(4, 3)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CRITERIA[name].score(w)
