"""Parity with torch.nn.BatchNorm{1,2,3}d and its autograd."""
import numpy as np
import pytest

import nbbn
from conftest import DTYPES, random_input

torch = pytest.importorskip("torch")

MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


def pair(shape, dtype, **kwargs):
    c = shape[1]
    ours = nbbn.BatchNorm(c, dtype=dtype, **kwargs)
    theirs = MODULES[len(shape)](c, dtype=TORCH_DTYPE[dtype], **kwargs)
    if ours.affine:
        rng = np.random.default_rng(7)
        ours.gamma[:] = rng.uniform(0.5, 2, c)
        ours.beta[:] = rng.standard_normal(c)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(ours.gamma))
            theirs.bias.copy_(torch.from_numpy(ours.beta))
    return ours, theirs


def step(ours, theirs, x, dy, dtype):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(torch.from_numpy(dy))
    y = ours(x)
    dx = ours.backward(dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[dtype])
    if ours.affine:
        np.testing.assert_allclose(ours.grad_gamma, theirs.weight.grad.numpy(), rtol=1e-4,
                                   atol=1e-4 * x.size if dtype == np.float32 else 1e-9)
        np.testing.assert_allclose(ours.grad_beta, theirs.bias.grad.numpy(), rtol=1e-4,
                                   atol=1e-4 * x.size if dtype == np.float32 else 1e-9)
        theirs.weight.grad = theirs.bias.grad = None
    if ours.track_running_stats:
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), **TOL[dtype])
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **TOL[dtype])
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 7), (3, 4, 100), (2, 64, 7, 7), (2, 3, 2, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}, {"eps": 1e-3, "momentum": 0.5}])
def test_train_and_eval_match_torch(rng, shape, dtype, kwargs):
    ours, theirs = pair(shape, dtype, **kwargs)
    for i in range(3):
        step(ours, theirs, random_input(rng, shape, dtype, loc=i), random_input(rng, shape, dtype), dtype)
    ours.eval()
    theirs.eval()
    step(ours, theirs, random_input(rng, shape, dtype), random_input(rng, shape, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_matches_torch_on_permuted_input(rng, dtype):
    x = random_input(rng, (4, 6, 5, 3), dtype)
    y = nbbn.batch_norm(x, training=True, axis=-1)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x).permute(0, 3, 1, 2), None, None, training=True)
    np.testing.assert_allclose(y, yt.permute(0, 2, 3, 1).numpy(), **TOL[dtype])


def test_functional_matches_torch(rng):
    x = random_input(rng, (8, 4, 6, 6), np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rmt, rvt = torch.zeros(4), torch.ones(4)
    w, b = rng.uniform(0.5, 2, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    for training in (True, False):
        y = nbbn.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        yt = torch.nn.functional.batch_norm(torch.from_numpy(x), rmt, rvt, torch.from_numpy(w),
                                            torch.from_numpy(b), training, 0.1, 1e-5)
        np.testing.assert_allclose(y, yt.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_through_torch(rng):
    ours, _ = pair((8, 3, 4, 4), np.float32)
    for i in range(2):
        ours(random_input(rng, (8, 3, 4, 4), np.float32, loc=i))
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    back = nbbn.BatchNorm(3)
    back.load_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    x = random_input(rng, (8, 3, 4, 4), np.float32)
    theirs.eval()
    np.testing.assert_allclose(back.eval()(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
