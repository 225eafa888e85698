"""Bad input: a clear error, and nothing changed."""

import numpy as np
import pytest

import nbbn
from conftest import assert_unchanged, snapshot
from nbbn.functional import batch_norm_backward


@pytest.fixture
def bn():
    layer = nbbn.BatchNorm(3)
    layer(np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32))
    return layer


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool, np.complex64, object, np.int16])
def test_non_float_dtype_is_a_type_error(bn, dtype):
    before = snapshot(bn)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        bn(np.ones((4, 3, 5), dtype=dtype))
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        nbbn.batch_norm(np.ones((4, 3), dtype=dtype), training=True)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("shape,match", [((3,), "2-D to 5-D"), ((2, 3, 1, 1, 1, 1), "2-D to 5-D"),
                                          ((4, 5, 2), "expected 3 channels.*got 5"),
                                          ((4, 0, 2), "expected 3 channels.*got 0")])
def test_bad_shapes(bn, shape, match):
    before = snapshot(bn)
    with pytest.raises(ValueError, match=match):
        bn(np.ones(shape, np.float32))
    assert_unchanged(bn, before)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_when_training(bn, shape):
    before = snapshot(bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(np.ones(shape, np.float32))
    assert_unchanged(bn, before)
    bn.eval()
    assert bn(np.ones(shape, np.float32)).shape == shape


def test_backward_errors():
    fresh = nbbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        fresh.backward(np.ones((2, 3), np.float32))
    x = np.ones((4, 3, 5), np.float32)
    fresh(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 3, 5\), got \(4, 3\)"):
        fresh.backward(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="dy must have dtype float32, got float64"):
        fresh.backward(np.ones((4, 3, 5)))
    assert fresh.grad_gamma is None


def test_backward_refuses_overwritten_input():
    bn = nbbn.BatchNorm(3)
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    bn(x, out=x)
    with pytest.raises(RuntimeError, match="overwritten"):
        bn.backward(np.ones_like(x))


@pytest.mark.parametrize("sd_change,match", [
    (lambda sd: sd.pop("running_var"), "missing"),
    (lambda sd: sd.update(extra=np.ones(3)), "unexpected"),
    (lambda sd: sd.update(weight=np.ones(4)), r"weight must have shape \(3,\), got \(4,\)"),
    (lambda sd: sd.update(running_mean=np.ones((3, 1))), "running_mean must have shape"),
    (lambda sd: sd.update(num_batches_tracked=np.array(-1)), "num_batches_tracked"),
])
def test_load_state_dict_all_or_nothing(bn, sd_change, match):
    sd = {k: v + 1 for k, v in bn.state_dict().items()}
    sd_change(sd)
    before = snapshot(bn)
    with pytest.raises(ValueError, match=match):
        bn.load_state_dict(sd)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("kwargs,error", [
    (dict(num_features=0), ValueError), (dict(num_features=2.5), ValueError),
    (dict(num_features=3, eps=0), ValueError), (dict(num_features=3, eps=-1.0), ValueError),
    (dict(num_features=3, momentum=float("nan")), ValueError),
    (dict(num_features=3, momentum=float("inf")), ValueError), (dict(num_features=3, axis=2), ValueError),
    (dict(num_features=3, dtype=np.int32), TypeError), (dict(num_features=3, dtype=np.complex64), TypeError),
])
def test_constructor_errors(kwargs, error):
    with pytest.raises(error):
        nbbn.BatchNorm(**kwargs)


def test_functional_errors():
    x = np.ones((4, 3, 2), np.float32)
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="required when training=False"):
        nbbn.batch_norm(x)
    with pytest.raises(ValueError, match="given together"):
        nbbn.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        nbbn.batch_norm(x, rm, np.ones(4, np.float32), training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nbbn.batch_norm(x, weight=np.ones(2), training=True)
    with pytest.raises(ValueError, match="out must have shape"):
        nbbn.batch_norm(x, training=True, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        nbbn.batch_norm(x, training=True, out=np.empty(x.shape))
    with pytest.raises(ValueError, match="writable, C-contiguous"):
        nbbn.batch_norm(x, training=True, out=np.empty((2, 3, 4), np.float32).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="momentum"):
        nbbn.batch_norm(x, rm, np.ones(3, np.float32), training=True, momentum=None)
    with pytest.raises(ValueError, match="running_mean must be writable"):
        ro = np.zeros(3, np.float32)
        ro.flags.writeable = False
        nbbn.batch_norm(x, ro, np.ones(3, np.float32), training=True)
    assert not rm.any()
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        batch_norm_backward(x, x, np.zeros(2), np.ones(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_does_not_poison_running_statistics(bad):
    bn = nbbn.BatchNorm(2)
    x = np.random.default_rng(0).standard_normal((8, 2, 3)).astype(np.float32)
    bn(x)
    before = snapshot(bn)
    x[3, 1, 2] = bad
    with pytest.warns(RuntimeWarning, match="not updated"):
        y = bn(x)
    assert np.isnan(y[:, 1]).all() or not np.isfinite(y[:, 1]).all()
    assert np.isfinite(y[:, 0]).all()
    assert_unchanged(bn, before)
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.warns(RuntimeWarning):
        nbbn.batch_norm(x, rm, rv, training=True)
    assert (rm == 0).all() and (rv == 1).all()


def test_input_is_never_modified_and_odd_arrays_work():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 4, 5, 7))
    expected = nbbn.batch_norm(base, training=True)
    variants = {
        "fortran": np.asfortranarray(base),
        "strided": np.ascontiguousarray(np.repeat(base, 2, axis=3))[..., ::2],
        "byteswapped": base.astype(">f8"),
        "readonly": base.copy(),
        "list": base.tolist(),
    }
    variants["readonly"].flags.writeable = False
    for name, x in variants.items():
        keep = np.array(x, copy=True)
        bn = nbbn.BatchNorm(4, dtype=np.float64)
        y = bn(x)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12, err_msg=name)
        bn.backward(np.ones_like(y))
        np.testing.assert_array_equal(np.asarray(x), keep, err_msg=name)
