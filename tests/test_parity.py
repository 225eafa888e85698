"""Every path of nbbn against the float64 NumPy reference in naive.py."""
import numpy as np
import pytest

import naive
import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, random_input
from nbbn.functional import batch_norm_backward, native_batch_norm


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_functional_forward_and_backward(rng, shape, axis, dtype, training):
    c = shape[axis]
    x = random_input(rng, shape, dtype)
    w, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = native_batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3, axis=axis)
    ref = naive.batch_norm(x, rm0, rv0, w, b, training, 0.3, 1e-3, axis=axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref[0], dtype)
    assert_close(rm, ref[1] if training else rm0, dtype)
    assert_close(rv, ref[2] if training else rv0, dtype)
    assert_close(mean, ref[3], dtype)
    assert_close(invstd, ref[4], dtype)

    dy = random_input(rng, shape, dtype, loc=0.1, scale=1.0)
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w, training, axis=axis)
    ref_dx, ref_dw, ref_db = naive.batch_norm_backward(dy, x, ref[3], ref[4], w, training, axis=axis)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert_close(dx, ref_dx, dtype)
    np.testing.assert_allclose(dw, ref_dw, rtol=RTOL[dtype], atol=ATOL[dtype] * x.size)
    np.testing.assert_allclose(db, ref_db, rtol=RTOL[dtype], atol=ATOL[dtype] * x.size)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_several_steps_train_then_eval(rng, shape, axis, dtype):
    c = shape[axis]
    bn = nbbn.BatchNorm(c, momentum=0.2, axis=axis, dtype=dtype)
    bn.gamma[:] = rng.uniform(0.5, 2, c)
    bn.beta[:] = rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)
    for step in range(3):
        x = random_input(rng, shape, dtype, loc=step)
        y = bn(x)
        y_ref, rm, rv, mean, invstd = naive.batch_norm(x, rm, rv, bn.gamma, bn.beta, True, 0.2, axis=axis)
        assert_close(y, y_ref, dtype)
        dy = random_input(rng, shape, dtype)
        dx = bn.backward(dy)
        ref = naive.batch_norm_backward(dy, x, mean, invstd, bn.gamma, True, axis=axis)
        assert_close(dx, ref[0], dtype)
        np.testing.assert_allclose(bn.grad_gamma, ref[1], rtol=RTOL[dtype], atol=ATOL[dtype] * x.size)
        np.testing.assert_allclose(bn.grad_beta, ref[2], rtol=RTOL[dtype], atol=ATOL[dtype] * x.size)
    assert bn.num_batches_tracked == 3
    assert_close(bn.running_mean, rm, dtype)
    assert_close(bn.running_var, rv, dtype)

    bn.eval()
    x = random_input(rng, shape, dtype)
    y_ref, *_, mean, invstd = naive.batch_norm(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta,
                                               False, axis=axis)
    assert_close(bn(x), y_ref, dtype)
    dy = random_input(rng, shape, dtype)
    ref = naive.batch_norm_backward(dy, x, mean, invstd, bn.gamma, False, axis=axis)
    assert_close(bn.backward(dy), ref[0], dtype)
    np.testing.assert_allclose(bn.grad_gamma, ref[1], rtol=RTOL[dtype], atol=ATOL[dtype] * x.size)
    assert bn.num_batches_tracked == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_none_is_cumulative_average(rng, dtype):
    bn = nbbn.BatchNorm(3, momentum=None, dtype=dtype)
    batches = [random_input(rng, (8, 3, 5, 5), dtype, loc=i) for i in range(4)]
    for x in batches:
        bn(x)
    means = [naive.batch_norm(x, training=True)[3] for x in batches]
    unbiased = [x.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for x in batches]
    assert_close(bn.running_mean, np.mean(means, axis=0), dtype)
    assert_close(bn.running_var, np.mean(unbiased, axis=0), dtype)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_false(rng, dtype):
    bn = nbbn.BatchNorm(4, affine=False, dtype=dtype)
    assert bn.gamma is None and bn.beta is None
    x = random_input(rng, (6, 4, 3, 3), dtype)
    y_ref, _, _, mean, invstd = naive.batch_norm(x, training=True)
    assert_close(bn(x), y_ref, dtype)
    dy = random_input(rng, x.shape, dtype)
    assert_close(bn.backward(dy), naive.batch_norm_backward(dy, x, mean, invstd)[0], dtype)
    assert bn.grad_gamma is None and bn.grad_beta is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_track_running_stats_false_uses_batch_statistics_in_eval(rng, dtype):
    bn = nbbn.BatchNorm(4, track_running_stats=False, dtype=dtype).eval()
    assert bn.running_mean is None and bn.running_var is None
    x = random_input(rng, (6, 4, 10), dtype)
    y_ref, _, _, mean, invstd = naive.batch_norm(x, training=True)
    assert_close(bn(x), y_ref, dtype)
    dy = random_input(rng, x.shape, dtype)
    assert_close(bn.backward(dy), naive.batch_norm_backward(dy, x, mean, invstd, bn.gamma, True)[0], dtype)
    assert bn.num_batches_tracked == 0
    assert set(bn.state_dict()) == {"weight", "bias"}


def test_functional_training_without_running_stats(rng):
    x = random_input(rng, (5, 3, 4), np.float64)
    np.testing.assert_allclose(nbbn.batch_norm(x, training=True), naive.batch_norm(x, training=True)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_out_argument(rng, shape, axis):
    x = random_input(rng, shape, np.float32)
    out = np.full(shape, np.nan, np.float32)
    y = nbbn.batch_norm(x, training=True, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(out, nbbn.batch_norm(x, training=True, axis=axis))


def test_layout_edges():
    """Row tiling with odd row counts, one huge channel, planes over several chunks."""
    rng = np.random.default_rng(0)
    for shape, axis in [((7, 3), 1), ((1, 2, 70001), 1), ((3, 5000), -1), ((2, 1, 33), 1),
                        ((1024, 3), -1), ((96, 2, 3, 3), -1)]:
        x = random_input(rng, shape, np.float64)
        np.testing.assert_allclose(nbbn.batch_norm(x, training=True, axis=axis),
                                   naive.batch_norm(x, training=True, axis=axis)[0],
                                   rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 5), 1), ((2, 3, 0), 1),
                                        ((0, 4, 3), -1)])
def test_a_batch_without_samples_is_counted_and_changes_nothing_else(shape, axis):
    """As torch: an empty output; in training the running statistics stay and
    the batch is counted; the gradients are empty and zero."""
    bn = nbbn.BatchNorm(3, axis=axis)
    x = np.ones(shape, np.float32)
    y = bn(x)
    assert y.shape == shape and bn.num_batches_tracked == 1
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.backward(y).shape == shape
    np.testing.assert_array_equal(bn.grad_gamma, 0)
    np.testing.assert_array_equal(bn.grad_beta, 0)
    assert bn.eval()(x).shape == shape and bn.num_batches_tracked == 1
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = nbbn.functional.native_batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5,
                                                        axis=axis)
    assert y.shape == shape and np.isnan(mean).all() and not rm.any() and (rv == 1).all()
    dx, dw, db = nbbn.functional.batch_norm_backward(y, x, mean, invstd, axis=axis)
    assert dx.shape == shape and dw.shape == db.shape == (3,) and not dw.any() and not db.any()


def test_a_one_dimensional_empty_input_gives_an_empty_output():
    """torch.nn.functional.batch_norm's degenerate case."""
    x = np.ones(0, np.float64)
    assert nbbn.batch_norm(x, np.zeros(0), np.ones(0), training=True).shape == (0,)
    assert nbbn.functional.batch_norm_backward(x, x, np.zeros(0), np.ones(0))[0].shape == (0,)


@pytest.mark.parametrize("momentum", [-1.0, 1.5, 2.0])
def test_momentum_outside_the_unit_interval_extrapolates_as_torch(rng, momentum):
    x = random_input(rng, (6, 3, 4), np.float64)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    ref = naive.batch_norm(x, rm, rv, training=True, momentum=momentum)
    for bn_momentum in (momentum,):
        bn = nbbn.BatchNorm(3, momentum=bn_momentum, dtype=np.float64)
        bn.running_mean[:], bn.running_var[:] = rm, rv
        bn(x)
        np.testing.assert_allclose(bn.running_mean, ref[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, ref[2], rtol=1e-12, atol=1e-12)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="momentum must be a finite number"):
            nbbn.batch_norm(x, rm, rv, training=True, momentum=bad)
