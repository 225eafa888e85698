"""Finite-difference gradient checks in float64."""
import numpy as np
import pytest

import nbbn
from naive import numeric_gradient


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 2, 3, 3), 1), ((2, 3, 2), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(shape, axis, training):
    rng = np.random.default_rng(2)
    c = shape[axis]
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape)  # loss = sum(w * bn(x)), so dy = w
    bn = nbbn.BatchNorm(c, dtype=np.float64, axis=axis, track_running_stats=not training).train(training)
    if not training:
        bn.running_mean[:] = rng.standard_normal(c)
        bn.running_var[:] = rng.uniform(0.5, 2, c)
    bn.gamma[:] = rng.uniform(0.5, 2, c)
    bn.beta[:] = rng.standard_normal(c)

    def loss():
        return float((w * bn.forward(x)).sum())

    bn.forward(x)
    dx = bn.backward(w)
    grad_gamma, grad_beta = bn.grad_gamma.copy(), bn.grad_beta.copy()
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_gamma, numeric_gradient(loss, bn.gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_beta, numeric_gradient(loss, bn.beta), rtol=1e-6, atol=1e-7)
