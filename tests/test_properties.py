"""Hypothesis property tests: random shapes, dtypes, momentum."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import nbbn
from conftest import ATOL, RTOL


@st.composite
def cases(draw):
    axis = draw(st.sampled_from([1, -1]))
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    c = shape[axis]
    if np.prod(shape) // c < 2:
        shape = (shape[0] + 1,) + shape[1:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    momentum = draw(st.one_of(st.none(), st.floats(0, 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, dtype, momentum, seed


@settings(deadline=None, max_examples=60)
@given(cases())
def test_layer_matches_reference(case):
    shape, axis, dtype, momentum, seed = case
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(dtype)
    bn = nbbn.BatchNorm(c, momentum=momentum, axis=axis, dtype=dtype)
    y = bn(x)
    factor = 1.0 if momentum is None else momentum
    y_ref, rm, rv, mean, invstd = naive.batch_norm(x, np.zeros(c), np.ones(c), training=True,
                                                   momentum=factor, axis=axis)
    tol = dict(rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(bn.running_mean, rm, **tol)
    np.testing.assert_allclose(bn.running_var, rv, **tol)
    dy = rng.standard_normal(shape).astype(dtype)
    dx_ref = naive.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    np.testing.assert_allclose(bn.backward(dy), dx_ref, rtol=RTOL[dtype] * 100, atol=ATOL[dtype] * 100)


@settings(deadline=None, max_examples=30)
@given(cases())
def test_output_is_normalized_and_input_untouched(case):
    shape, axis, dtype, _, seed = case
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 4 + 3
    keep = x.copy()
    y = nbbn.batch_norm(x, training=True, eps=1e-12, axis=axis).astype(np.float64)
    axes = naive.reduce_axes(x.ndim, axis)
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-4)
    spread = x.astype(np.float64).std(axis=axes)
    std = y.std(axis=axes)
    np.testing.assert_allclose(std[spread > 1e-3], 1, rtol=1e-3)
    np.testing.assert_array_equal(x, keep)
