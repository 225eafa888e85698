"""fold_linear / fold_conv: the folded layer computes the eval-mode
bn(layer(x)), and matches torch.nn.utils.fusion."""
import copy

import numpy as np
import pytest

import nbbn
from conftest import DTYPES


def conv(x, weight, bias=None, groups=1):
    """Float64 cross-correlation, stride 1, no padding, as torch's ConvNd, any rank."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    rank = weight.ndim - 2
    spatial = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(x, weight.shape[2:], axis=spatial)
    cin, cout = weight.shape[1], weight.shape[0] // groups
    parts = []
    for g in range(groups):
        w = weight[g * cout:(g + 1) * cout]
        win = windows[:, g * cin:(g + 1) * cin]
        y = np.tensordot(win, w, axes=([1] + [2 + rank + i for i in range(rank)],
                                       [1] + [2 + i for i in range(rank)]))
        parts.append(np.moveaxis(y, -1, 1))
    y = np.concatenate(parts, axis=1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape((-1,) + (1,) * rank)
    return y


def linear(x, weight, bias=None):
    y = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    return y if bias is None else y + bias


def trained_bn(c, rng, dtype=np.float64, affine=True, cls=nbbn.BatchNorm, **kw):
    """An eval-mode layer whose statistics are far from the defaults."""
    bn = cls(c, affine=affine, dtype=dtype, momentum=0.5, **kw)
    if affine:
        bn.gamma[:] = rng.uniform(-2.0, 2.0, c)
        bn.beta[:] = rng.standard_normal(c)
    for _ in range(3):
        bn(rng.standard_normal((16, c)) * rng.uniform(0.1, 5.0, c) + rng.normal(0, 3, c))
    return bn.eval()


@pytest.mark.parametrize("cls", [nbbn.BatchNorm, nbbn.BatchRenorm])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_linear_equals_bn_of_linear(rng, cls, affine, with_bias):
    bn = trained_bn(6, rng, affine=affine, cls=cls)
    w, b = rng.standard_normal((6, 5)), (rng.standard_normal(6) if with_bias else None)
    x = rng.standard_normal((8, 5))
    w2, b2 = nbbn.fold_linear(bn, w, b)
    np.testing.assert_allclose(linear(x, w2, b2), bn(linear(x, w, b)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [nbbn.BatchNorm, nbbn.BatchRenorm])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kernel,groups", [((3,), 1), ((3, 2), 1), ((2, 1, 3), 1), ((3, 3), 2)])
def test_folded_conv_equals_bn_of_conv(rng, cls, affine, kernel, groups):
    cin, cout = 4, 6
    bn = trained_bn(cout, rng, affine=affine, cls=cls)
    w, b = rng.standard_normal((cout, cin // groups) + kernel), rng.standard_normal(cout)
    x = rng.standard_normal((3, cin) + tuple(k + 4 for k in kernel))
    w2, b2 = nbbn.fold_conv(bn, w, b)
    np.testing.assert_allclose(conv(x, w2, b2, groups), bn(conv(x, w, b, groups)),
                               rtol=1e-12, atol=1e-12)
    w3, b3 = nbbn.fold_conv(bn, w, None)
    np.testing.assert_allclose(conv(x, w3, b3, groups), bn(conv(x, w, None, groups)),
                               rtol=1e-12, atol=1e-12)


def test_conv_reference_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, w = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((6, 2, 3, 2))
    b = rng.standard_normal(6)
    expected = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (x, w, b)), groups=2)
    np.testing.assert_allclose(conv(x, w, b, 2), expected.numpy(), rtol=1e-12, atol=1e-12)


def torch_args(bn, torch):
    c = bn.num_features
    as_t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    return (as_t(bn.running_mean), as_t(bn.running_var), bn.eps,
            as_t(bn.gamma if bn.affine else np.ones(c, bn.dtype)),
            as_t(bn.beta if bn.affine else np.zeros(c, bn.dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(rng, dtype, affine, with_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights
    bn = trained_bn(5, rng, dtype=dtype, affine=affine)
    w = rng.standard_normal((5, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    tw, tb = fuse_linear_bn_weights(torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                                    *torch_args(bn, torch))
    w2, b2 = nbbn.fold_linear(bn, w, b)
    assert w2.dtype == b2.dtype == dtype
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    np.testing.assert_allclose(w2, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kernel", [(3,), (3, 3), (1, 2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_matches_torch(rng, dtype, affine, kernel, with_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    bn = trained_bn(4, rng, dtype=dtype, affine=affine)
    w = rng.standard_normal((4, 2) + kernel).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if with_bias else None
    tw, tb = fuse_conv_bn_weights(torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                                  *torch_args(bn, torch))
    w2, b2 = nbbn.fold_conv(bn, w, b)
    assert w2.dtype == b2.dtype == dtype and w2.shape == w.shape
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    np.testing.assert_allclose(w2, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=tol, atol=tol * 10)


def test_torch_module_with_folded_weights(rng):
    """End to end: a torch Conv2d + BatchNorm2d pair against nbbn's fold."""
    torch = pytest.importorskip("torch")
    layer, tbn = torch.nn.Conv2d(3, 5, 3).double(), torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        tbn.weight.uniform_(-2, 2), tbn.bias.normal_()
        tbn.running_mean.normal_(), tbn.running_var.uniform_(0.1, 4)
    tbn.eval()
    bn = nbbn.BatchNorm(5, dtype=np.float64).eval()
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    w2, b2 = nbbn.fold_conv(bn, layer.weight.detach().numpy(), layer.bias.detach().numpy())
    x = torch.from_numpy(rng.standard_normal((2, 3, 8, 8)))
    expected = tbn(layer(x)).detach().numpy()
    got = torch.nn.functional.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w_dtype,bn_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_result_dtype_follows_the_weight(rng, w_dtype, bn_dtype):
    bn = trained_bn(3, rng, dtype=bn_dtype)
    w = rng.standard_normal((3, 2, 2)).astype(w_dtype)
    b = rng.standard_normal(3).astype(bn_dtype)
    w2, b2 = nbbn.fold_conv(bn, w, b)
    assert w2.dtype == b2.dtype == w_dtype
    big_endian = w[:, :, 0].astype(np.dtype(w_dtype).newbyteorder(">"))
    w2, b2 = nbbn.fold_linear(bn, big_endian)
    assert w2.dtype == b2.dtype == w_dtype and w2.dtype.isnative


def test_inputs_are_not_modified(rng):
    bn = trained_bn(3, rng)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    saved = copy.deepcopy((bn.__dict__, w, b))
    w2, b2 = nbbn.fold_linear(bn, w, b)
    assert not np.shares_memory(w2, w) and not np.shares_memory(b2, b)
    np.testing.assert_array_equal(w, saved[1])
    np.testing.assert_array_equal(b, saved[2])
    for k, v in saved[0].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(bn.__dict__[k], v)


@pytest.mark.parametrize("fold", [nbbn.fold_linear, nbbn.fold_conv])
def test_errors(rng, fold):
    bn = trained_bn(3, rng)
    w = rng.standard_normal((3, 2) if fold is nbbn.fold_linear else (3, 2, 3))
    with pytest.raises(ValueError, match="evaluation mode"):
        fold(trained_bn(3, rng).train(), w, None)
    no_stats = nbbn.BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        fold(no_stats, w, None)
    with pytest.raises(ValueError, match=r"bn has 4 channels but .* has 3 output"):
        fold(trained_bn(4, rng), w, None)
    with pytest.raises(TypeError, match="float32 or float64, got int64"):
        fold(bn, w.astype(np.int64), None)
    with pytest.raises(TypeError, match="float32 or float64, got complex64"):
        fold(bn, w.astype(np.complex64), None)
    with pytest.raises(TypeError, match="BatchNorm or BatchRenorm, got dict"):
        fold({}, w, None)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), got \(4,\)"):
        fold(bn, w, np.zeros(4))
    with pytest.raises(TypeError, match="bias must be a real array"):
        fold(bn, w, np.array(["a", "b", "c"]))
    bad_rank = w[..., 0] if fold is nbbn.fold_conv else w[..., None]
    with pytest.raises(ValueError, match="weight must be"):
        fold(bn, bad_rank, None)
