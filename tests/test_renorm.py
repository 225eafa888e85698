"""BatchRenorm against a float64 reference written from the paper, against
finite differences, and against BatchNorm when rmax=1, dmax=0."""
import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, assert_unchanged, random_input, snapshot
from naive import batch_norm, batch_renorm, batch_renorm_backward, per_channel, reduce_axes


def make(c, dtype, rng, affine=True, **kw):
    layer = nbbn.BatchRenorm(c, affine=affine, dtype=dtype, **kw)
    if affine:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.standard_normal(c)
    return layer


def skewed_input(rng, shape, axis, dtype):
    """Channels with different scales and offsets, so some r and d are clipped."""
    c = shape[axis]
    scale = per_channel(np.geomspace(0.2, 6.0, c), len(shape), axis)
    loc = per_channel(np.linspace(-3.0, 3.0, c), len(shape), axis)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def close(actual, desired, dtype, scale=1.0):
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype], atol=ATOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (3.0, 5.0), (np.inf, np.inf)])
def test_training_matches_paper_reference_over_steps(rng, shape, axis, dtype, rmax, dmax):
    c = shape[axis]
    layer = make(c, dtype, rng, axis=axis, rmax=rmax, dmax=dmax, momentum=0.2)
    mu, sigma = np.zeros(c), np.sqrt(1.0 + layer.eps)
    for step in range(4):
        x = skewed_input(rng, shape, axis, dtype)
        dy = random_input(rng, shape, dtype)
        y = layer(x)
        dx = layer.backward(dy)
        ref = batch_renorm(x, mu, sigma, layer.gamma, layer.beta, rmax, dmax, 0.2, layer.eps, axis)
        y_ref, mu, sigma, mean_b, std_b, r, d = ref
        dx_ref, dg_ref, db_ref = batch_renorm_backward(dy, x, mean_b, std_b, r, d, layer.gamma,
                                                       axis)
        assert y.dtype == dtype and dx.dtype == dtype
        close(y, y_ref, dtype, 10)
        close(dx, dx_ref, dtype, 10)
        close(layer.grad_gamma, dg_ref, dtype, x.size)
        close(layer.grad_beta, db_ref, dtype, x.size)
        close(layer.running_mean, mu, dtype)
        close(layer.running_std, sigma, dtype)
        assert layer.num_batches_tracked == step + 1
    if rmax == 1.5:  # the test means something only if the clipping was active
        assert np.any(r == rmax) or np.any(r == 1 / rmax)
        assert np.any(np.abs(d) == dmax)


def _loss(x, dy, r, d, weight, bias, eps, axis):
    """sum(dy * y) with r and d frozen, for finite differences."""
    axes = reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    std = np.sqrt(((x - per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes) + eps)
    y = ((x - per_channel(mean, x.ndim, axis)) / per_channel(std, x.ndim, axis)
         * per_channel(r, x.ndim, axis) + per_channel(d, x.ndim, axis))
    y = y * per_channel(weight, x.ndim, axis) + per_channel(bias, x.ndim, axis)
    return (dy * y).sum()


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 2), 1), ((3, 2, 4), -1)])
def test_backward_matches_finite_differences(rng, shape, axis):
    c = shape[axis]
    layer = make(c, np.float64, rng, axis=axis, rmax=1.2, dmax=0.3)
    layer.running_mean[:] = rng.standard_normal(c)
    layer.running_var[:] = rng.uniform(0.2, 3.0, c)
    x = skewed_input(rng, shape, axis, np.float64)
    dy = rng.standard_normal(shape)
    _, _, _, _, _, r, d = batch_renorm(x, layer.running_mean, layer.running_std, rmax=1.2,
                                       dmax=0.3, eps=layer.eps, axis=axis)
    layer(x)
    dx = layer.backward(dy)
    h = 1e-6
    args = (dy, r, d, layer.gamma, layer.beta, layer.eps, axis)
    fd = np.empty(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        e = e.reshape(shape)
        fd[i] = (_loss(x + e, *args) - _loss(x - e, *args)) / (2 * h)
    np.testing.assert_allclose(dx.ravel(), fd, rtol=1e-6, atol=1e-7)
    for name, grad in (("gamma", layer.grad_gamma), ("beta", layer.grad_beta)):
        fd = np.empty(c)
        for i in range(c):
            params = {"weight": layer.gamma.copy(), "bias": layer.beta.copy()}
            key = "weight" if name == "gamma" else "bias"
            params[key][i] += h
            up = _loss(x, dy, r, d, params["weight"], params["bias"], layer.eps, axis)
            params[key][i] -= 2 * h
            down = _loss(x, dy, r, d, params["weight"], params["bias"], layer.eps, axis)
            fd[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


def _equal_to_batchnorm(shape, axis, dtype, affine, rng, steps=3):
    """rmax=1, dmax=0: forward outputs, input gradients and parameter gradients
    of every training step are bitwise those of BatchNorm."""
    c = shape[axis]
    renorm = make(c, dtype, rng, affine=affine, axis=axis, rmax=1.0, dmax=0.0, momentum=0.3)
    bn = nbbn.BatchNorm(c, momentum=0.3, affine=affine, axis=axis, dtype=dtype)
    if affine:
        bn.gamma[:], bn.beta[:] = renorm.gamma, renorm.beta
    for _ in range(steps):
        x = skewed_input(rng, shape, axis, dtype)
        dy = random_input(rng, shape, dtype)
        np.testing.assert_array_equal(renorm(x), bn(x))
        np.testing.assert_array_equal(renorm.backward(dy), bn.backward(dy))
        if affine:
            np.testing.assert_array_equal(renorm.grad_gamma, bn.grad_gamma)
            np.testing.assert_array_equal(renorm.grad_beta, bn.grad_beta)
        close(renorm.running_mean, bn.running_mean, dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_rmax_1_dmax_0_is_exactly_batchnorm_in_training(rng, shape, axis, dtype, affine):
    _equal_to_batchnorm(shape, axis, dtype, affine, rng)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(2, 9), c=st.integers(1, 5), m=st.integers(1, 80),
       axis=st.sampled_from([1, -1]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 999))
def test_rmax_1_dmax_0_is_batchnorm_for_any_shape(n, c, m, axis, dtype, seed):
    shape = (n, c, m) if axis == 1 else (n, m, c)
    _equal_to_batchnorm(shape, axis, dtype, True, np.random.default_rng(seed), steps=2)


def test_moving_statistics_follow_the_paper_not_torch(rng):
    """The moving sigma averages sqrt(biased var + eps); running_var stores
    sigma**2 - eps, so BatchNorm's variance update differs."""
    x = skewed_input(rng, (8, 3, 6), 1, np.float64)
    layer = nbbn.BatchRenorm(3, momentum=0.5, dtype=np.float64)
    layer(x)
    _, _, sigma, _, std_b, _, _ = batch_renorm(x, np.zeros(3), np.sqrt(1 + 1e-5), momentum=0.5)
    np.testing.assert_allclose(layer.running_var, sigma ** 2 - 1e-5, rtol=1e-13)
    np.testing.assert_allclose(layer.running_std, (np.sqrt(1 + 1e-5) + std_b) / 2, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_eval_uses_moving_mean_and_sigma(rng, shape, axis, dtype):
    c = shape[axis]
    layer = make(c, dtype, rng, axis=axis, momentum=0.3)
    for _ in range(3):
        layer(skewed_input(rng, shape, axis, dtype))
    layer.eval()
    x = skewed_input(rng, shape, axis, dtype)
    dy = random_input(rng, shape, dtype)
    mu, sigma = layer.running_mean.astype(np.float64), layer.running_std
    expected = ((x - per_channel(mu, x.ndim, axis)) / per_channel(sigma, x.ndim, axis)
                * per_channel(layer.gamma, x.ndim, axis) + per_channel(layer.beta, x.ndim, axis))
    close(layer(x), expected, dtype, 10)
    expected_dx = dy * per_channel(layer.gamma / sigma, x.ndim, axis)
    close(layer.backward(dy), expected_dx, dtype, 10)
    ref = batch_norm(x, layer.running_mean, layer.running_var, layer.gamma, layer.beta,
                     eps=layer.eps, axis=axis)[0]
    close(layer(x), ref, dtype, 10)


def test_state_loads_into_torch_batchnorm_with_the_same_eval_output(rng):
    torch = pytest.importorskip("torch")
    layer = make(4, np.float64, rng, momentum=0.3)
    for _ in range(3):
        layer(skewed_input(rng, (5, 4, 3, 3), 1, np.float64))
    layer.eval()
    tbn = torch.nn.BatchNorm2d(4, eps=layer.eps).double().eval()
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    x = skewed_input(rng, (5, 4, 3, 3), 1, np.float64)
    np.testing.assert_allclose(layer(x), tbn(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip(rng):
    a = make(3, np.float32, rng)
    a(skewed_input(rng, (6, 3), 1, np.float32))
    state = a.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var",
                             "weight"]
    b = nbbn.BatchRenorm(3)
    b.load_state_dict(state)
    x = skewed_input(rng, (6, 3), 1, np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    np.testing.assert_array_equal(a.running_var, b.running_var)
    assert b.num_batches_tracked == 2
    assert sorted(nbbn.BatchRenorm(3, affine=False).state_dict()) == [
        "num_batches_tracked", "running_mean", "running_var"]


def test_rmax_dmax_can_be_relaxed_during_training(rng):
    layer = nbbn.BatchRenorm(2, rmax=1, dmax=0, dtype=np.float64, momentum=0.0)
    layer.running_mean[:] = [10.0, -10.0]
    layer.running_var[:] = 100.0 - layer.eps  # sigma = 10: r = sigma_B / 10 is clipped
    x = rng.standard_normal((8, 2))
    y0 = layer(x)  # plain batch norm
    layer.dmax = 0.5
    y1 = layer(x)
    np.testing.assert_allclose(y1 - y0, np.broadcast_to([-0.5, 0.5], (8, 2)), atol=1e-12)
    layer.rmax = 2
    assert (layer.rmax, layer.dmax) == (2.0, 0.5)
    np.testing.assert_allclose(layer(x), y0 / 2 + [-0.5, 0.5], atol=1e-12)


def test_cumulative_average_with_momentum_none(rng):
    layer = nbbn.BatchRenorm(2, momentum=None, dtype=np.float64)
    stds = []
    for _ in range(3):
        x = skewed_input(rng, (7, 2), 1, np.float64)
        layer(x)
        stds.append(np.sqrt(x.var(axis=0) + layer.eps))
    np.testing.assert_allclose(layer.running_std, np.mean(stds, axis=0), rtol=1e-12)


def test_nan_batch_skips_the_moving_update_with_a_warning(rng):
    layer = make(3, np.float32, rng)
    layer(skewed_input(rng, (4, 3, 5), 1, np.float32))
    before = copy.deepcopy((layer.running_mean, layer.running_var, layer.num_batches_tracked))
    x = skewed_input(rng, (4, 3, 5), 1, np.float32)
    x[1, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = layer(x)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()
    np.testing.assert_array_equal(layer.running_mean, before[0])
    np.testing.assert_array_equal(layer.running_var, before[1])
    assert layer.num_batches_tracked == before[2]


def test_out_and_caller_arrays(rng):
    layer = make(3, np.float32, rng)
    x = skewed_input(rng, (4, 3, 5), 1, np.float32)
    keep = x.copy()
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(x, keep)
    layer(x, out=x)
    with pytest.raises(RuntimeError, match="overwritten"):
        layer.backward(np.ones_like(x))


@pytest.mark.parametrize("name,value,lowest", [("rmax", 0.5, 1), ("rmax", np.nan, 1),
                                                ("rmax", "3", 1), ("rmax", True, 1),
                                                ("dmax", -1e-3, 0), ("dmax", None, 0)])
def test_bad_rmax_dmax(rng, name, value, lowest):
    with pytest.raises(ValueError, match=f"{name} must be a number >= {lowest}.*got"):
        nbbn.BatchRenorm(3, **{name: value})
    layer = make(3, np.float32, rng)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=name):
        setattr(layer, name, value)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("x,error,match", [
    (np.ones((4, 5), np.float32), ValueError, "expected 3 channels.*got 5"),
    (np.ones((4, 3), np.int64), TypeError, "int64"),
    (np.ones((1, 3), np.float32), ValueError, "Expected more than 1 value per channel"),
    (np.ones((4, 0), np.float32), ValueError, "expected 3 channels.*got 0"),
    (np.ones((4, 3), np.float32), ValueError, "out must have shape"),
])
def test_bad_input_changes_nothing(rng, x, error, match):
    layer = make(3, np.float32, rng)
    layer(skewed_input(rng, (4, 3), 1, np.float32))
    before = snapshot(layer)
    out = np.empty((2, 3), np.float32) if "out" in match else None
    with pytest.raises(error, match=match):
        layer(x, out=out)
    assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="dy must have shape"):
        layer.backward(np.ones((5, 3), np.float32))
    assert layer.grad_gamma is None


def test_backward_before_forward_and_constructor_errors():
    with pytest.raises(RuntimeError, match="before any forward"):
        nbbn.BatchRenorm(2).backward(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="momentum"):
        nbbn.BatchRenorm(2, momentum=float("nan"))
    with pytest.raises(TypeError, match="dtype"):
        nbbn.BatchRenorm(2, dtype=np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repr(nbbn.BatchRenorm(2)).startswith("BatchRenorm(2, rmax=3.0, dmax=5.0")
