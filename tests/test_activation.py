"""The fused ReLU (``activation='relu'``): against the float64 reference, the
unfused nbbn path, torch's ``relu(batch_norm(x))`` and its autograd; errors."""
import numpy as np
import pytest

import naive
import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, random_input
from nbbn.functional import batch_norm_backward, native_batch_norm

TORCH_TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


def params(rng, c):
    return rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c) * 0.1, \
        rng.uniform(0.5, 2, c)


@pytest.mark.parametrize("shape,axis", SHAPES + [((4, 3, 70000), 1), ((3000, 24), -1),
                                                 ((13, 9000), 1), ((3, 20000), 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_matches_the_reference(rng, shape, axis, dtype, training):
    x = random_input(rng, shape, dtype)
    dy = random_input(rng, shape, dtype)
    c = shape[axis]
    w, b, rm, rv = params(rng, c)
    rm32, rv32 = rm.astype(dtype), rv.astype(dtype)
    y, mean, invstd = native_batch_norm(x, rm32, rv32, w, b, training, 0.1, 1e-5, axis=axis,
                                       activation="relu")
    ref, ref_rm, ref_rv, ref_mean, ref_invstd = naive.batch_norm_relu(
        x, rm, rv, w, b, training, 0.1, 1e-5, axis=axis)
    np.testing.assert_allclose(y, ref, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert (y >= 0).all()
    np.testing.assert_allclose(rm32, ref_rm, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(rv32, ref_rv, rtol=RTOL[dtype], atol=ATOL[dtype])
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w, training, axis=axis, y=y,
                                     activation="relu")
    # The mask is the saved output's: the reference takes the same one.
    rdx, rdw, rdb = naive.batch_norm_relu_backward(dy, x, ref_mean, ref_invstd, y, w, training,
                                                   axis)
    n = x.size // c
    np.testing.assert_allclose(dx, rdx, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * n)
    np.testing.assert_allclose(db, rdb, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * n)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_unfused_then_relu(rng, shape, axis, dtype):
    x = random_input(rng, shape, dtype)
    dy = random_input(rng, shape, dtype)
    w, b, _, _ = params(rng, shape[axis])
    y0, mean, invstd = native_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, axis=axis)
    y = nbbn.batch_norm(x, None, None, w, b, True, axis=axis, activation="relu")
    np.testing.assert_array_equal(y, np.maximum(y0, 0))
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w, axis=axis, y=y, activation="relu")
    ex, ew, eb = batch_norm_backward(np.where(y > 0, dy, 0).astype(dtype), x, mean, invstd, w,
                                     axis=axis)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, ex, **tol)
    np.testing.assert_allclose(dw, ew, **tol)
    np.testing.assert_allclose(db, eb, **tol)


def test_nan_propagates_through_the_relu_and_gets_no_gradient():
    x = np.ones((2, 3, 4))
    x[0, 1, 2] = np.nan
    y = nbbn.batch_norm(x, np.zeros(3), np.ones(3), activation="relu")
    assert np.isnan(y[0, 1, 2]) and np.isfinite(np.delete(y.ravel(), 6)).all()
    dx, _, _ = batch_norm_backward(np.ones_like(x), x, np.zeros(3), np.ones(3), training=False,
                                   y=y, activation="relu")
    assert dx[0, 1, 2] == 0


def test_constant_channel_gives_exact_zeros():
    x = np.full((4, 2, 100), 3.25, dtype=np.float32)
    x[:, 1] = np.random.default_rng(0).standard_normal((4, 100))
    y = nbbn.batch_norm(x, training=True, activation="relu")
    assert (y[:, 0] == 0).all()


def test_caller_arrays_are_not_modified(rng):
    x = random_input(rng, (4, 3, 10), np.float32)
    dy = random_input(rng, (4, 3, 10), np.float32)
    bn = nbbn.BatchNorm(3, activation="relu")
    x0, dy0 = x.copy(), dy.copy()
    y = bn(x)
    y0 = y.copy()
    bn.backward(dy)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("k", [2, 3])
def test_ghost_batches_with_relu(rng, k):
    shape = (7, 3, 5, 4)
    x, dy = random_input(rng, shape, np.float64), random_input(rng, shape, np.float64)
    bn = nbbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=k, activation="relu")
    y = bn(x)
    dx = bn.backward(dy)
    ref, rm, rv, stats = naive.ghost_batch_norm(x, np.zeros(3), np.ones(3), k=k)
    np.testing.assert_allclose(y, np.maximum(ref, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
    rdx, rdw, rdb = naive.ghost_batch_norm_backward(np.where(y > 0, dy, 0), x, stats, k=k)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_gamma, rdw, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_beta, rdb, rtol=1e-10, atol=1e-10)


def test_bad_activation_and_saved_output_are_refused(rng):
    with pytest.raises(ValueError, match="activation"):
        nbbn.BatchNorm(3, activation="tanh")
    with pytest.raises(TypeError, match="activation"):
        nbbn.BatchNorm(3, activation=1)
    with pytest.raises(TypeError):
        nbbn.BatchNorm(3, 1e-5, 0.1, True, True, "relu")  # keyword-only
    x = random_input(rng, (4, 3, 5), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="activation"):
        nbbn.batch_norm(x, rm, rv, training=True, activation="gelu")
    np.testing.assert_array_equal(rm, 0)  # nothing updated
    y, mean, invstd = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5,
                                        activation="relu")
    out = np.full_like(x, 7)
    with pytest.raises(ValueError, match="needs y"):
        batch_norm_backward(x, x, mean, invstd, activation="relu", out=out)
    with pytest.raises(ValueError, match="only used with"):
        batch_norm_backward(x, x, mean, invstd, y=y, out=out)
    with pytest.raises(ValueError, match="shape"):
        batch_norm_backward(x, x, mean, invstd, y=y[:2], activation="relu", out=out)
    with pytest.raises(TypeError, match="dtype"):
        batch_norm_backward(x, x, mean, invstd, y=y.astype(np.float64), activation="relu",
                            out=out)
    np.testing.assert_array_equal(out, 7)


def test_layer_repr_and_sync_conversion():
    bn = nbbn.BatchNorm(3, activation="relu")
    assert "activation='relu'" in repr(bn)
    assert "activation" not in repr(nbbn.BatchNorm(3))
    comm = type("OneRank", (), {"Allgather": lambda self, s, r: r.__setitem__(..., s),
                                "Get_rank": lambda self: 0, "Get_size": lambda self: 1})()
    assert nbbn.SyncBatchNorm.from_batchnorm(bn, comm=comm).activation == "relu"


# --- torch -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 7), (3, 4, 100), (2, 64, 7, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_torch_relu_batch_norm(rng, shape, dtype, training):
    torch = pytest.importorskip("torch")
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
    c = shape[1]
    w, b, rm, rv = (v.astype(dtype) for v in params(rng, c))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = torch.relu(torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, 0.1, 1e-5))
    yt.backward(torch.from_numpy(dy))
    y, mean, invstd = native_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation="relu")
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w, training, y=y, activation="relu")
    tol = TORCH_TOL[dtype]
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(rm, rmt.numpy(), **tol)
    np.testing.assert_allclose(rv, rvt.numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    big = dict(rtol=tol["rtol"], atol=tol["atol"] * x.size)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **big)
    np.testing.assert_allclose(db, bt.grad.numpy(), **big)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_matches_torch_batchnorm_then_relu(rng, dtype):
    torch = pytest.importorskip("torch")
    shape = (4, 3, 6, 5)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    theirs = torch.nn.BatchNorm2d(3, dtype=tdt)
    ours = nbbn.BatchNorm(3, dtype=dtype, activation="relu")
    ours.gamma[:] = rng.uniform(0.5, 2, 3)
    ours.beta[:] = rng.standard_normal(3)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.gamma))
        theirs.bias.copy_(torch.from_numpy(ours.beta))
    tol = TORCH_TOL[dtype]
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = torch.relu(theirs(xt))
        yt.backward(torch.from_numpy(dy))
        y = ours(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
        np.testing.assert_allclose(ours.grad_gamma, theirs.weight.grad.numpy(), rtol=1e-4,
                                   atol=tol["atol"] * x.size)
        np.testing.assert_allclose(ours.grad_beta, theirs.bias.grad.numpy(), rtol=1e-4,
                                   atol=tol["atol"] * x.size)
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), **tol)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **tol)
        theirs.weight.grad = theirs.bias.grad = None
