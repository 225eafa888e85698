"""Ghost batch normalization (BatchNorm(virtual_batch_size=k)) against a loop
of plain batch norms over the groups: nbbn's own BatchNorm, and the float64
NumPy reference."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, assert_unchanged, random_input, snapshot
from naive import batch_norm, ghost_batch_norm, ghost_batch_norm_backward

#: (shape, axis) with a batch axis long enough to split in uneven groups (2-D ones never
#: leave a last group of one sample for the k tested).
GHOST_SHAPES = [((14, 3), 1), ((7, 3, 5), 1), ((6, 2, 100), 1), ((5, 3, 4, 5), 1),
                ((5, 2, 2, 3, 4), 1), ((7, 4, 3, 2), -1), ((8, 4), -1)]


def make(c, dtype, rng, k, affine=True, **kw):
    layer = nbbn.BatchNorm(c, affine=affine, dtype=dtype, virtual_batch_size=k, **kw)
    if affine:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.standard_normal(c)
    return layer


def plain_copy(layer):
    """A BatchNorm with the same state and no ghost batches."""
    other = nbbn.BatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine,
                           layer.track_running_stats, axis=layer.axis, dtype=layer.dtype)
    other.load_state_dict(layer.state_dict())
    return other


def close(actual, desired, dtype, scale=1.0):
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype], atol=ATOL[dtype] * scale)


def groups_of(n, k):
    return [slice(lo, lo + k) for lo in range(0, n, k)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", GHOST_SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4, 100])
def test_matches_a_loop_of_batchnorms(rng, shape, axis, dtype, k):
    """Bitwise what the same BatchNorm gives when called group by group."""
    c = shape[axis]
    ghost = make(c, dtype, rng, k, axis=axis)
    plain = plain_copy(ghost)
    for _ in range(2):
        x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
        y = ghost(x)
        dx = ghost.backward(dy)
        ys, dxs, dgs, dbs = [], [], [], []
        for part in groups_of(shape[0], k):
            ys.append(plain(x[part]))
            dxs.append(plain.backward(dy[part]))
            dgs.append(plain.grad_gamma.astype(np.float64))
            dbs.append(plain.grad_beta.astype(np.float64))
        np.testing.assert_array_equal(y, np.concatenate(ys))
        np.testing.assert_array_equal(dx, np.concatenate(dxs))
        close(ghost.grad_gamma, sum(dgs), dtype)
        close(ghost.grad_beta, sum(dbs), dtype)
        for key, value in plain.state_dict().items():
            np.testing.assert_array_equal(ghost.state_dict()[key], value)
    assert ghost.num_batches_tracked == 2 * len(groups_of(shape[0], k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,k", [(s, a, k) for s, a in GHOST_SHAPES for k in (1, 2, 3, 5)
                                          if not (len(s) == 2 and k == 1)])  # k=1: an error
def test_matches_float64_reference(rng, shape, axis, dtype, k):
    c = shape[axis]
    ghost = make(c, dtype, rng, k, axis=axis, momentum=0.3)
    rm, rv = np.zeros(c), np.ones(c)
    for _ in range(2):
        x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
        y_ref, rm, rv, stats = ghost_batch_norm(x, rm, rv, ghost.gamma, ghost.beta, k, 0.3,
                                                ghost.eps, axis)
        dx_ref, dg_ref, db_ref = ghost_batch_norm_backward(dy, x, stats, ghost.gamma, k, axis)
        close(ghost(x), y_ref, dtype, 10)
        close(ghost.backward(dy), dx_ref, dtype, 10)
        close(ghost.grad_gamma, dg_ref, dtype, x.size)
        close(ghost.grad_beta, db_ref, dtype, x.size)
        close(ghost.running_mean, rm, dtype)
        close(ghost.running_var, rv, dtype)


@settings(deadline=None, max_examples=30)
@given(n=st.integers(2, 12), k=st.integers(1, 13), c=st.integers(1, 4), m=st.integers(2, 70),
       axis=st.sampled_from([1, -1]), seed=st.integers(0, 999))
def test_any_group_size(n, k, c, m, axis, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c, m) if axis == 1 else (n, m, c)
    ghost = make(c, np.float64, rng, k, axis=axis)
    x = random_input(rng, shape, np.float64)
    y_ref, rm, rv, stats = ghost_batch_norm(x, np.zeros(c), np.ones(c), ghost.gamma,
                                            ghost.beta, k, 0.1, ghost.eps, axis)
    close(ghost(x), y_ref, np.float64, 10)
    close(ghost.running_var, rv, np.float64)
    assert ghost.num_batches_tracked == len(stats) == -(-n // k)


def test_groups_are_along_axis_0_for_channels_last(rng):
    ghost = make(3, np.float64, rng, 2, axis=-1)
    x = random_input(rng, (4, 5, 3), np.float64)
    y = ghost(x)
    for part in (slice(0, 2), slice(2, 4)):
        ref = batch_norm(x[part], None, None, ghost.gamma, ghost.beta, True, axis=-1)[0]
        close(y[part], ref, np.float64, 10)


def test_momentum_none_counts_groups_as_steps(rng):
    ghost = make(2, np.float64, rng, 3, momentum=None)
    x = random_input(rng, (9, 2, 4), np.float64)
    ghost(x)
    means = [x[part].mean(axis=(0, 2)) for part in groups_of(9, 3)]
    np.testing.assert_allclose(ghost.running_mean, np.mean(means, axis=0), rtol=1e-12)
    assert ghost.num_batches_tracked == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_eval_is_unchanged(rng, shape, axis, dtype):
    c = shape[axis]
    ghost = make(c, dtype, rng, 2, axis=axis)
    ghost(random_input(rng, shape, dtype))
    plain = plain_copy(ghost)
    ghost.eval(), plain.eval()
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
    np.testing.assert_array_equal(ghost(x), plain(x))
    np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(ghost.grad_gamma, plain.grad_gamma)


def test_without_running_stats(rng):
    ghost = make(3, np.float64, rng, 2, track_running_stats=False)
    x = random_input(rng, (5, 3, 4), np.float64)
    ref = ghost_batch_norm(x, None, None, ghost.gamma, ghost.beta, 2, axis=1)[0]
    close(ghost(x), ref, np.float64, 10)
    assert ghost.num_batches_tracked == 0
    ghost.eval()  # no running statistics: the whole batch's, as BatchNorm does
    close(ghost(x), batch_norm(x, None, None, ghost.gamma, ghost.beta, True)[0], np.float64, 10)


def test_nan_group_skips_only_its_update(rng):
    ghost = make(2, np.float64, rng, 2)
    x = random_input(rng, (6, 2, 3), np.float64)
    x[3, 1, 0] = np.nan  # second group
    plain = plain_copy(ghost)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = ghost(x)
    assert np.isnan(y[2:4, 1]).all() and np.isfinite(y[:2]).all() and np.isfinite(y[4:]).all()
    with pytest.warns(RuntimeWarning):
        for part in groups_of(6, 2):
            plain(x[part])
    np.testing.assert_array_equal(ghost.running_var, plain.running_var)
    assert ghost.num_batches_tracked == plain.num_batches_tracked == 2


def test_out_and_caller_arrays(rng):
    ghost = make(3, np.float32, rng, 2)
    x = random_input(rng, (5, 3, 4), np.float32)
    keep = x.copy()
    out = np.empty_like(x)
    assert ghost(x, out=out) is out
    np.testing.assert_array_equal(x, keep)
    dy = random_input(rng, x.shape, np.float32)
    dx_out = np.empty_like(x)
    assert ghost.backward(dy, out=dx_out) is dx_out
    ghost(x, out=x)
    with pytest.raises(RuntimeError, match="overwritten"):
        ghost.backward(dy)


def test_repr():
    assert "virtual_batch_size=8" in repr(nbbn.BatchNorm(3, virtual_batch_size=8))
    assert "virtual_batch_size" not in repr(nbbn.BatchNorm(3))


@pytest.mark.parametrize("k", [0, -2, 2.5, True, "4", np.float64(3.0)])
def test_bad_virtual_batch_size(k):
    with pytest.raises(ValueError, match=re.escape("virtual_batch_size must be None or a "
                                                   f"positive integer, got {k!r}")):
        nbbn.BatchNorm(3, virtual_batch_size=k)


@pytest.mark.parametrize("shape,k", [((5, 3), 2), ((4, 3), 1), ((1, 3), 4)])
def test_group_of_one_value_per_channel_raises_and_changes_nothing(rng, shape, k):
    ghost = make(3, np.float32, rng, k)
    ghost.virtual_batch_size = 2
    ghost(random_input(rng, (4, 3), np.float32))
    ghost.virtual_batch_size = k
    before = snapshot(ghost)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"
                                         r".*virtual_batch_size"):
        ghost(random_input(rng, shape, np.float32))
    assert_unchanged(ghost, before)


def test_a_last_group_of_one_sample_is_fine_with_spatial_dims(rng):
    ghost = make(3, np.float64, rng, 2)
    x = random_input(rng, (5, 3, 4), np.float64)
    y_ref = ghost_batch_norm(x, np.zeros(3), np.ones(3), ghost.gamma, ghost.beta, 2)[0]
    close(ghost(x), y_ref, np.float64, 10)


@pytest.mark.parametrize("x,error,match", [
    (np.ones((4, 5), np.float32), ValueError, "expected 3 channels.*got 5"),
    (np.ones((4, 3), np.int64), TypeError, "int64"),
    (np.ones((4, 0), np.float32), ValueError, "expected 3 channels.*got 0"),
    (np.ones((4, 3), np.float32), ValueError, "out must have shape"),
])
def test_bad_input_changes_nothing(rng, x, error, match):
    ghost = make(3, np.float32, rng, 2)
    ghost(random_input(rng, (4, 3), np.float32))
    before = snapshot(ghost)
    out = np.empty((2, 3), np.float32) if "out" in match else None
    with pytest.raises(error, match=match):
        ghost(x, out=out)
    assert_unchanged(ghost, before)
    for dy, error, match in [(np.ones((5, 3), np.float32), ValueError, "dy must have shape"),
                             (np.ones((4, 3), np.float64), TypeError, "dy must have dtype")]:
        with pytest.raises(error, match=match):
            ghost.backward(dy)
    with pytest.raises(ValueError, match="out must have shape"):
        ghost.backward(np.ones((4, 3), np.float32), out=np.empty((3, 3), np.float32))
    assert ghost.grad_gamma is None
