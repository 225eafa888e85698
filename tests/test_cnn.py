"""The NumPy CNN of nbbn.programs.cnn: every gradient against finite differences (float64)
and against torch's autograd, and its layers against torch's."""
import numpy as np
import pytest

from conftest import assert_network_matches_torch
from naive import numeric_gradient
from nbbn.programs.cnn import CNN, AvgPool2d, Conv2d
from nbbn.programs.mlp import cross_entropy


def images(rng, n=4, shape=(1, 8, 8), classes=3):
    return rng.standard_normal((n, *shape)) * 2 + 0.5, rng.integers(0, classes, n)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_gradients_match_finite_differences(batch_norm):
    rng = np.random.default_rng(0)
    x, labels = images(rng)
    net = CNN((1, 8, 8), 3, batch_norm, channels=(2, 3), seed=1)
    for bn in net.norms:                       # away from the initial gamma=1, beta=0
        bn.gamma[:] = rng.uniform(0.5, 2, bn.num_features)
        bn.beta[:] = rng.standard_normal(bn.num_features)

    def loss():
        return cross_entropy(net.forward(x), labels)[0]

    dx = net.backward(cross_entropy(net.forward(x), labels)[1])
    grads = [g.copy() for g in net.gradients()]
    params = net.parameters()
    # conv, (gamma, beta) or bias, conv, (gamma, beta) or bias, linear weight and bias
    assert len(params) == len(grads) == (8 if batch_norm else 6)
    for p, g in zip(params, grads):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_allclose(g, numeric_gradient(loss, p), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kernel,padding", [(3, 0), (3, 1), (3, 2), (1, 0), (2, 1)])
def test_conv_matches_torch(kernel, padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    conv = Conv2d(3, 4, kernel, padding, True, rng)
    conv.bias[:] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 5, 6))
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(conv.weight.copy()).requires_grad_()
    bt = torch.from_numpy(conv.bias.copy()).requires_grad_()
    yt = torch.nn.functional.conv2d(xt, wt, bt, padding=padding)
    y = conv.forward(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(dy))
    dx = conv.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.grad_weight, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.grad_bias, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_avg_pool_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 6))
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.avg_pool2d(xt, 2)
    pool = AvgPool2d(2)
    np.testing.assert_allclose(pool.forward(x), yt.detach().numpy(), rtol=1e-14)
    dy = rng.standard_normal(yt.shape)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(pool.backward(dy), xt.grad.numpy(), rtol=1e-14)


def test_matches_torch_forward_and_autograd():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    rng = np.random.default_rng(3)
    x, labels = images(rng, n=6, classes=10)
    net = CNN((1, 8, 8), 10, seed=4, channels=(3, 5))
    convs = [layer for layer in net.layers if isinstance(layer, Conv2d)]
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(20, 10)).double()
    linear = net.layers[-1]
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(convs[0].weight))
        model[4].weight.copy_(torch.from_numpy(convs[1].weight))
        model[9].weight.copy_(torch.from_numpy(linear.weight))
        model[9].bias.copy_(torch.from_numpy(linear.bias))
    assert_network_matches_torch(
        net, model, x, labels,
        [model[0].weight, model[1].weight, model[1].bias, model[4].weight, model[5].weight,
         model[5].bias, model[9].weight, model[9].bias], [model[1], model[5]])


def test_same_seed_same_weights_and_float32():
    with_bn, without = CNN((1, 8, 8), 10, True, seed=7), CNN((1, 8, 8), 10, False, seed=7)
    def weights(net):
        return [layer.weight for layer in net.layers if hasattr(layer, "weight")]

    for a, b in zip(weights(with_bn), weights(without), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [type(layer).__name__ for layer in without.layers] == [
        "Conv2d", "ReLU", "AvgPool2d", "Conv2d", "ReLU", "AvgPool2d", "Flatten", "Linear"]
    net = CNN((2, 4, 4), 3, seed=0, channels=(4,), dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((5, 2, 4, 4)).astype(np.float32)
    logits = net.forward(x)
    dx = net.backward(cross_entropy(logits, np.arange(5) % 3)[1])
    assert logits.shape == (5, 3) and logits.dtype == np.float32 and dx.dtype == np.float32
    assert all(p.dtype == np.float32 for p in net.parameters())
    assert all(g.dtype == np.float32 for g in net.gradients())


def test_init_scale_multiplies_every_weight():
    base, scaled = CNN((1, 8, 8), 10, seed=2), CNN((1, 8, 8), 10, seed=2, init_scale=0.01)
    for a, b in zip(base.parameters(), scaled.parameters()):
        if a.ndim > 1:
            np.testing.assert_allclose(b, 0.01 * a, rtol=1e-14)


@pytest.mark.parametrize("args", [((1, 6, 8), 10), ((1, 8, 8), 0), ((0, 8, 8), 10)])
def test_bad_shapes(args):
    with pytest.raises(ValueError, match="got"):
        CNN(*args)
