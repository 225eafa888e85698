"""Half precision against torch's CPU BatchNorm: both of torch's modes (float32
parameters and running statistics with half inputs, and the all-half layer), the
outputs' errors of both libraries against the float64 result rounded once (nbbn's
within 1 ulp, and never larger than torch's), and state_dict round trips."""
import numpy as np
import pytest

import naive
import nbbn
from test_half_layers import BF16, F16, HALVES, half_input, ulps

torch = pytest.importorskip("torch")

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def to_torch(a):
    """A NumPy array (float16, bfloat16, float32) as a tensor of its type; bfloat16
    through float32, which holds it exactly (torch reads no ml_dtypes arrays)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_numpy(t, dtype):
    """A tensor as a NumPy array of ``dtype`` (bfloat16 through float32: exact)."""
    return t.detach().float().numpy().astype(dtype)


def torch_state(state, dtype):
    return {k: torch.tensor(int(v)) if k == "num_batches_tracked" else to_torch(v)
            for k, v in state.items()}


@pytest.mark.parametrize("all_half", [False, True], ids=["mixed", "all-half"])
@pytest.mark.parametrize("dtype", HALVES)
def test_training_steps_and_state_round_trip_match_torch(dtype, all_half):
    rng = np.random.default_rng(0)
    pdt = dtype if all_half else np.dtype(np.float32)
    ours = nbbn.BatchNorm(4, momentum=0.2, dtype=dtype, param_dtype=pdt)
    theirs = torch.nn.BatchNorm2d(4, momentum=0.2, dtype=TORCH[dtype.name] if all_half
                                  else torch.float32)
    ours.load_state_dict({k: to_numpy(v, pdt) if k != "num_batches_tracked" else v.numpy()
                          for k, v in theirs.state_dict().items()})
    errors = {"nbbn": 0, "torch": 0}
    for step in range(3):
        x = half_input(rng, (6, 4, 9, 10), dtype, loc=step - 1.0)
        dy = half_input(rng, (6, 4, 9, 10), dtype, loc=0.0, scale=1.0)
        y = ours(x)
        dx = ours.backward(dy)
        xt = to_torch(x).requires_grad_(True)
        yt = theirs(xt)
        yt.backward(to_torch(dy))
        ref = naive.batch_norm(x, weight=ours.gamma.astype(np.float64),
                               bias=ours.beta.astype(np.float64), training=True)[0]
        errors["nbbn"] = max(errors["nbbn"], ulps(y, ref))
        errors["torch"] = max(errors["torch"], ulps(to_numpy(yt, dtype), ref))
        np.testing.assert_allclose(dx.astype(np.float64), to_numpy(xt.grad, np.float64),
                                   rtol=2 ** -6, atol=2 ** -6)
        assert ours.grad_gamma.dtype == pdt
        np.testing.assert_allclose(ours.grad_gamma.astype(np.float64),
                                   to_numpy(theirs.weight.grad, np.float64), rtol=2 ** -6,
                                   atol=2 ** -4)
        theirs.weight.grad = theirs.bias.grad = None
    assert errors["nbbn"] <= 1 and errors["nbbn"] <= errors["torch"], errors
    # the running statistics after the same batches, and the states both ways
    state = ours.state_dict()
    for k, v in theirs.state_dict().items():
        if k == "num_batches_tracked":
            assert int(v) == state[k] == 3
            continue
        assert state[k].dtype == pdt
        # all-half: each of the three updates rounds, in both libraries
        ulp = 2.0 ** -10 if dtype == F16 else 2.0 ** -7
        np.testing.assert_allclose(state[k].astype(np.float64), to_numpy(v, np.float64),
                                   rtol=6 * ulp if all_half else 1e-6)
    theirs.load_state_dict(torch_state(state, pdt))
    back = nbbn.BatchNorm(4, dtype=dtype, param_dtype=pdt)
    back.load_state_dict({k: to_numpy(v, pdt) if k != "num_batches_tracked" else v.numpy()
                          for k, v in theirs.state_dict().items()})
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    # evaluation with the shared statistics
    ours.eval(), theirs.eval()
    x = half_input(rng, (6, 4, 9, 10), dtype)
    ref = naive.batch_norm(x, state["running_mean"], state["running_var"],
                           state["weight"], state["bias"])[0]
    assert ulps(ours(x), ref) <= 1
    with torch.no_grad():
        assert ulps(to_numpy(theirs(to_torch(x)), dtype), ref) <= 4


@pytest.mark.parametrize("dtype", HALVES)
def test_large_offset_torch_error_versus_nbbn(dtype):
    """A channel far from zero (mean 1000 x its spread): nbbn stays within 1 ulp;
    torch's half error is measured alongside (it is reported, not bounded)."""
    rng = np.random.default_rng(9)
    x64 = rng.standard_normal((16, 3, 12, 12))
    x64[:, 1] = x64[:, 1] * 0.5 + 500.0
    x64[:, 2] = 300.0  # constant: exactly 0 out
    x = x64.astype(dtype)
    y = nbbn.batch_norm(x, training=True)
    ref = naive.batch_norm(x, training=True)[0]
    assert ulps(y, ref) <= 1 and not y[:, 2].astype(np.float32).any()
    with torch.no_grad():
        yt = to_numpy(torch.nn.functional.batch_norm(to_torch(x), None, None, training=True),
                      dtype)
    assert ulps(y, ref) <= ulps(yt, ref)
