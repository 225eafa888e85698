import copy

import numpy as np
import pytest

#: One of each shape family torch's BatchNorm1d/2d/3d takes (axis=1), and channels-last.
SHAPES = [
    ((16, 5), 1),            # BatchNorm1d (N, C)
    ((4, 3, 7), 1),          # BatchNorm1d (N, C, L), short planes: rows layout
    ((3, 4, 300), 1),        # (N, C, L), planes layout, outputs by channel runs
    ((2, 64, 7, 7), 1),      # BatchNorm2d, rows layout (planes of 49 values) by runs
    ((2, 3, 2, 5, 7), 1),    # BatchNorm3d
    ((5, 6, 7, 3), -1),      # channels-last images
    ((6, 4), -1),
]
DTYPES = [np.float32, np.float64]
#: Relative tolerance of float32 results against the float64 reference.
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_input(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def channels(shape, axis):
    return shape[axis]


#: Parts of a layer that hold no state of their own: compared by identity.
SHARED = ("_backend", "_collective")


def snapshot(layer):
    """A deep copy of a layer's state, for :func:`assert_unchanged`."""
    return {k: v if k in SHARED else copy.deepcopy(v) for k, v in vars(layer).items()}


def assert_unchanged(layer, before):
    """The layer's state equals the :func:`snapshot` ``before`` (saved
    forward context aside): a refused input changed nothing."""
    after = vars(layer)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k in SHARED:
            assert after[k] is v, k
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after[k], v)
        elif k == "_correction":
            assert vars(after[k]) == vars(v), k
        elif k != "_saved":
            assert after[k] == v, k


def assert_network_matches_torch(net, model, x, labels, parameters, norms):
    """One training step of a NumPy network of ``nbbn.programs`` (``net``)
    against a float64 torch ``model`` holding the same weights: logits, loss,
    the gradients of ``parameters`` (torch's, in ``net.parameters()`` order),
    the running statistics of ``norms`` (torch's, in ``net.norms`` order), then
    the evaluation-mode output."""
    import torch

    from nbbn.programs.mlp import cross_entropy
    xt = torch.from_numpy(x)
    logits_t = model(xt)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()
    logits = net.forward(x)
    loss, dlogits = cross_entropy(logits, labels)
    net.backward(dlogits)
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for g, p in zip(net.gradients(), parameters, strict=True):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-9, atol=1e-12)
    for bn, tbn in zip(net.norms, norms, strict=True):
        np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-10)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-10)
    net.eval(), model.eval()
    np.testing.assert_allclose(net.forward(x), model(xt).detach().numpy(), rtol=1e-10,
                               atol=1e-12)
