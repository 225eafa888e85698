"""Half-precision inputs (float16, bfloat16) through the functional API and the layers:
outputs within 1 ulp of the float64 result rounded once to the input's type, exact zeros
on constant channels, NaN batches skipped, every option composed with them. Lean on
purpose: every (dtype, layout, kernel) signature is a numba compile, so the tests reuse
a few shapes (serial and parallel, planes and rows) and float32 parameters, the layers'
mixed-precision default."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import nbbn
import nbbn.functional as F
from conftest import assert_unchanged, snapshot
from nbbn._engine import FORWARD_GRAIN, layout_of

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 is an optional extra: pip install "nbbn[bfloat16]"
    BF16 = None
F16 = np.dtype(np.float16)
HALVES = [pytest.param(F16, id="float16"),
          pytest.param(BF16, id="bfloat16",
                       marks=pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes"))]
#: (shape, axis): serial planes, rows by channel runs, (N, C) (with rows long
#: enough for the input gradient's blocks of columns), channels-last; the
#: last two are over nbbn's serial limit (2 * FORWARD_GRAIN elements for a forward), so the
#: parallel kernels run:
#: planes with a task per channel, rows split into channel blocks. bfloat16 takes the
#: serial ones only: the kernels' code is the same for both types but for the element
#: conversions (tests/test_half.py), and each parallel kernel is seconds of compiling.
SHAPES = {"planes": ((3, 4, 32, 40), 1), "rows-runs": ((2, 64, 7, 7), 1), "NC": ((33, 6), 1),
          "NC-wide": ((9, 5000), 1),
          "channels-last": ((2, 5, 6, 3), -1), "planes-parallel": ((8, 16, 16, 72), 1),
          "rows-parallel": ((16384, 12), 1)}
CASES = [pytest.param(*dt.values, *shape, id=f"{dt.id}-{name}", marks=dt.marks)
         for dt in HALVES for name, shape in SHAPES.items()
         if dt.id == "float16" or "parallel" not in name]


def ordered(a):
    """Half values as integers in the order of the values (for ulp distances)."""
    bits = a.view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def ulps(actual, reference):
    """Largest distance in ulps of the half array ``actual`` from the float64
    ``reference`` rounded once to its type; NaNs must be where the reference has them."""
    expected = reference.astype(actual.dtype)  # NumPy's and ml_dtypes' casts round once
    nan = np.isnan(reference)
    np.testing.assert_array_equal(np.isnan(actual.astype(np.float32)), nan)
    return int(np.abs(ordered(actual) - ordered(expected))[~nan].max(initial=0))


def half_input(rng, shape, dtype, loc=3.0, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def params(rng, channels):
    """float32 gamma and beta, as a mixed-precision layer holds them."""
    return ((rng.standard_normal(channels) * 0.5 + 1).astype(np.float32),
            rng.standard_normal(channels).astype(np.float32))


@pytest.mark.parametrize("dtype,shape,axis", CASES)
def test_forward_and_backward_within_one_ulp(dtype, shape, axis):
    assert ((layout_of(shape, axis, 2).team(64, FORWARD_GRAIN) > 1)
            == (np.prod(shape) >= 2 * FORWARD_GRAIN))
    rng = np.random.default_rng(18)
    x = half_input(rng, shape, dtype)
    c = shape[axis]
    w, b = params(rng, c)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    x_before = x.copy()
    y, mean, invstd = F.native_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis)
    ref, ref_rm, ref_rv, ref_mean, ref_invstd = naive.batch_norm(
        x, np.zeros(c), np.ones(c), w, b, training=True, axis=axis)
    assert y.dtype == dtype and ulps(y, ref) <= 1
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-6)
    # evaluation with the running statistics, written into out=
    out = np.empty_like(x)
    assert F.batch_norm(x, rm, rv, w, b, False, axis=axis, out=out) is out
    assert ulps(out, naive.batch_norm(x, rm, rv, w, b, axis=axis)[0]) <= 1
    # backward through the batch statistics
    dy = half_input(rng, shape, dtype, loc=0.0, scale=1.0)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, True, axis=axis)
    ref_dx, ref_dw, ref_db = naive.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    assert dx.dtype == dtype and dw.dtype == db.dtype == np.float32
    # dx sums terms that cancel: 1 ulp, or a float64 rounding of the terms' size
    assert ulps(dx, ref_dx) <= 1 or np.allclose(dx.astype(np.float64), ref_dx,
                                                 rtol=2 ** -8, atol=1e-12)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(db, ref_db, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x.view(np.uint16), x_before.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES)
def test_relu_and_fixed_statistics_backward(dtype):
    """The fused ReLU forward and its masked backward, through batch and fixed statistics."""
    rng = np.random.default_rng(7)
    shape, c = (3, 4, 9, 10), 4
    x = half_input(rng, shape, dtype, loc=0.0)
    w, b = params(rng, c)
    y, mean, invstd = F.native_batch_norm(x, None, None, w, b, True, 0.1, 1e-5,
                                          activation="relu")
    ref = np.maximum(naive.batch_norm(x, weight=w, bias=b, training=True)[0], 0.0)
    assert ulps(y, ref) <= 1 and (y.astype(np.float32) == 0).any()
    dy = half_input(rng, shape, dtype, loc=0.0, scale=1.0)
    mask = y.astype(np.float64) > 0
    for training in (True, False):
        dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training, y=y,
                                           activation="relu")
        ref_dx, ref_dw, _ = naive.batch_norm_backward(dy * mask, x, mean, invstd, w, training)
        assert ulps(dx, ref_dx) <= 1 or np.allclose(dx.astype(np.float64), ref_dx,
                                                     rtol=2 ** -8, atol=1e-12)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("constant", [False, True], ids=["float32-form", "float64-form"])
def test_long_rows_by_blocks_of_columns(dtype, constant):
    """Rows longer than ``ROW_TASK`` values, whose outputs are written by blocks
    of columns: within 1 ulp in the float32 form, and in the float64 one, which
    channels constant at 4096 take (their ``|mean * scale|`` is past
    ``HALF_LIMIT``: eps alone divides), exactly 0 there. (The calls of the
    test above: its kernels, compiled once.)"""
    rng = np.random.default_rng(5)
    shape, c = (5, 20000), 20000
    x = half_input(rng, shape, dtype)
    w, b = params(rng, c)
    if constant:
        x[:, ::7], b[::7] = 4096.0, 0.0
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, invstd = F.native_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    assert ulps(y, naive.batch_norm(x, np.zeros(c), np.ones(c), w, b, training=True)[0]) <= 1
    assert not constant or not y[:, ::7].astype(np.float32).any()
    out = np.empty_like(x)
    F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, out=out)
    assert ulps(out, naive.batch_norm(x, rm, rv, w, b)[0]) <= 1


#: Each type's largest finite value: offsets up to its range.
LARGEST = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


@pytest.mark.parametrize("dtype", HALVES)
@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_offsets_up_to_the_range_and_constant_channels(dtype, data):
    """Any offset the type holds, any spread down to a few of its ulps, and constant
    channels: within 1 ulp, and exactly 0 on constant channels (eps=0 would divide
    0 by 0 there; torch's default eps keeps the output 0, as float64 does)."""
    top = LARGEST[dtype.name]
    offset = data.draw(st.floats(-top / 4, top / 4, allow_nan=False), label="offset")
    rel = data.draw(st.floats(2.0 ** -6, 1.0), label="spread / |offset|")
    spread = max(abs(offset) * rel, data.draw(st.floats(1e-3, 10.0), label="spread"))
    spread = min(spread, top / 8)
    constant = data.draw(st.lists(st.booleans(), min_size=3, max_size=3), label="constant")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    x64 = rng.standard_normal((4, 3, 8, 9)) * spread + offset
    x64[:, constant] = offset
    with np.errstate(over="ignore"):
        x = x64.astype(dtype)
    if not np.isfinite(x.astype(np.float64)).all():
        return  # rounded past the largest value: not an input of this type
    y = F.batch_norm(x, training=True)
    ref = naive.batch_norm(x, training=True)[0]
    assert ulps(y, ref) <= 1
    assert (y[:, constant].astype(np.float32) == 0).all()  # exactly


@pytest.mark.parametrize("dtype", HALVES)
def test_nan_batch_skips_the_running_update(dtype):
    x = half_input(np.random.default_rng(3), (3, 4, 9, 10), dtype)
    x[1, 2, 3, 4] = np.nan
    bn = nbbn.BatchNorm(4, dtype=dtype)
    before = bn.state_dict()
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = bn(x)
    assert np.isnan(y[:, 2].astype(np.float32)).all()
    assert np.isfinite(y[:, [0, 1, 3]].astype(np.float32)).all()
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_dtype_validation():
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64, got int16"):
        F.batch_norm(np.zeros((2, 3), np.int16), training=True)
    x = np.ones((2, 3), F16)
    with pytest.raises(TypeError, match="dy must have dtype float16, got float32"):
        F.batch_norm_backward(np.ones((2, 3), np.float32), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="out must have dtype float16, got float32"):
        F.batch_norm(x, training=True, out=np.empty((2, 3), np.float32))
    with pytest.raises(TypeError, match="param_dtype must be float16, bfloat16, float32 or "
                                        "float64, got <class 'numpy.int32'>"):
        nbbn.BatchNorm(3, dtype=np.float16, param_dtype=np.int32)
    assert nbbn.BatchNorm(3, dtype=np.float16).param_dtype == np.float32
    assert nbbn.BatchNorm(3, dtype="float16", param_dtype="float16").gamma.dtype == F16
    if BF16 is not None:
        bn = nbbn.BatchNorm(3, dtype="bfloat16", param_dtype="bfloat16")
        assert bn.dtype == bn.running_var.dtype == BF16
        assert repr(bn).endswith("dtype=bfloat16, param_dtype=bfloat16)")


def test_byteswapped_and_readonly_half_inputs():
    """A big-endian float16 input, and a read-only one, give the native one's bits and are
    not written to (the kernels read a native copy)."""
    rng = np.random.default_rng(5)
    x = half_input(rng, (6, 4, 3), F16)
    w, b = params(rng, 4)
    expected = F.batch_norm(x, None, None, w, b, training=True)
    swapped, frozen = x.astype(">f2"), x.copy()
    frozen.flags.writeable = False
    for arg in (swapped, frozen):
        keep = arg.copy()
        np.testing.assert_array_equal(F.batch_norm(arg, None, None, w, b, training=True),
                                      expected)
        np.testing.assert_array_equal(arg, keep)


def test_bfloat16_without_ml_dtypes(monkeypatch):
    """Without ml_dtypes bfloat16 is absent, and asking for it by name says what to install."""
    monkeypatch.setitem(__import__("sys").modules, "ml_dtypes", None)  # import fails
    with pytest.raises(TypeError, match=r"bfloat16 needs the ml_dtypes package.*nbbn\[bfloat16\]"):
        nbbn.BatchNorm(3, dtype="bfloat16")
    with pytest.raises(TypeError, match=r"bfloat16 needs the ml_dtypes"):
        nbbn.BatchNorm(3, param_dtype="bfloat16")


@pytest.mark.parametrize("param_dtype", [np.float32, "half"], ids=["mixed", "all-half"])
@pytest.mark.parametrize("dtype", HALVES)
def test_layer_options_compose(dtype, param_dtype):
    """Training and evaluation, backward, ReLU, ghost batches, Batch Renormalization and
    precise statistics on half inputs; parameters in float32 (mixed) or the input's type."""
    pdt = dtype if param_dtype == "half" else np.dtype(param_dtype)
    rng = np.random.default_rng(11)
    shape = (6, 4, 9, 10)
    x = half_input(rng, shape, dtype)
    dy = half_input(rng, shape, dtype, loc=0.0, scale=1.0)
    kw = dict(dtype=dtype, param_dtype=pdt)
    # ghost batches with the ReLU: two groups, each normalized by its own statistics
    bn = nbbn.BatchNorm(4, activation="relu", virtual_batch_size=3, **kw)
    assert bn.gamma.dtype == bn.running_mean.dtype == pdt
    y = bn(x)
    ref = np.concatenate([np.maximum(naive.batch_norm(x[:3], training=True)[0], 0),
                          np.maximum(naive.batch_norm(x[3:], training=True)[0], 0)])
    assert y.dtype == dtype and ulps(y, ref) <= 1 and bn.num_batches_tracked == 2
    dx = bn.backward(dy)
    assert dx.dtype == dtype and bn.grad_gamma.dtype == pdt
    mask = y.astype(np.float64) > 0
    g0 = naive.batch_norm_backward(dy[:3] * mask[:3], x[:3], *naive.batch_norm(
        x[:3], training=True)[3:])
    np.testing.assert_allclose(dx[:3].astype(np.float64), g0[0], rtol=2 ** -7, atol=2e-3)
    # running statistics of the two groups, in the parameters' type
    rm = 0.9 * (0.9 * 0 + 0.1 * x[:3].astype(np.float64).mean((0, 2, 3))) \
        + 0.1 * x[3:].astype(np.float64).mean((0, 2, 3))
    np.testing.assert_allclose(bn.running_mean.astype(np.float64), rm, rtol=2 ** -7)
    # evaluation, then Batch Renormalization with the same statistics
    y_eval = bn.eval()(x)
    ref_eval = np.maximum(naive.batch_norm(x, bn.running_mean.astype(np.float64),
                                           bn.running_var.astype(np.float64))[0], 0)
    assert ulps(y_eval, ref_eval) <= 1
    br = nbbn.BatchRenorm(4, rmax=1.5, dmax=0.5, momentum=0.1, **kw)
    y_r = br(x)
    mu_b = x.astype(np.float64).mean((0, 2, 3))
    ref_r = naive.batch_renorm(x, np.zeros(4), np.ones(4), rmax=1.5, dmax=0.5, momentum=0.1)[0]
    assert y_r.dtype == dtype and ulps(y_r, ref_r) <= 1
    assert br.backward(dy).dtype == dtype and br.grad_gamma.dtype == pdt
    np.testing.assert_allclose(br.running_mean.astype(np.float64), 0.1 * mu_b, rtol=2 ** -7)
    # precise statistics over two batches: those of their concatenation
    p = nbbn.BatchNorm(4, **kw)
    with nbbn.precise_statistics([p]):
        p(x[:2])
        p(x[2:])
    np.testing.assert_allclose(p.running_var.astype(np.float64),
                               x.astype(np.float64).var((0, 2, 3), ddof=1), rtol=2 ** -7)
    assert p.running_var.dtype == pdt


@pytest.mark.parametrize("dtype", HALVES)
def test_fold_and_state_dict_of_a_half_layer(dtype):
    rng = np.random.default_rng(5)
    bn = nbbn.BatchNorm(4, dtype=dtype, param_dtype=dtype)
    bn(half_input(rng, (6, 4, 9, 10), dtype))
    bn.eval()
    state = bn.state_dict()
    assert all(v.dtype == dtype for k, v in state.items() if k != "num_batches_tracked")
    twin = nbbn.BatchNorm(4, dtype=dtype, param_dtype=dtype)
    twin.load_state_dict(state)
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    w = rng.standard_normal((4, 5)).astype(dtype)
    fw, fb = nbbn.fold_linear(bn, w)
    assert fw.dtype == fb.dtype == dtype
    x = rng.standard_normal((7, 5))
    np.testing.assert_allclose((x @ fw.astype(np.float64).T + fb.astype(np.float64)),
                               bn((x @ w.astype(np.float64).T)).astype(np.float64),
                               rtol=2 ** -6, atol=2 ** -6)


def test_a_refused_input_changes_nothing():
    bn = nbbn.BatchNorm(3, dtype=np.float16)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(np.ones((4, 5), np.float16))
    assert_unchanged(bn, before)


def test_sync_batchnorm_on_half_slices():
    """SyncBatchNorm over two ranks (threads sharing an Allgather), half parameters:
    each rank's slice normalized with the whole batch's statistics, within 1 ulp, and
    the input gradient through them. float16 only: bfloat16 runs the same passes, and
    they are seconds of compiling each (the other tests run its conversions)."""
    from test_mpi import on_ranks, thread_comms
    rng = np.random.default_rng(2)
    x = half_input(rng, (5, 3, 8, 9), F16)
    dy = half_input(rng, (5, 3, 8, 9), F16, loc=0.0, scale=1.0)
    bounds = [(0, 2), (2, 5)]

    def rank(comm):
        lo, hi = bounds[comm.Get_rank()]
        bn = nbbn.SyncBatchNorm(3, dtype=F16, param_dtype=F16, comm=comm)
        return bn(x[lo:hi]), bn.backward(dy[lo:hi]), bn.running_var, bn.grad_gamma

    results = on_ranks(thread_comms(2), rank)
    y = np.concatenate([r[0] for r in results])
    ref, _, ref_rv, mean, invstd = naive.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    assert y.dtype == F16 and ulps(y, ref) <= 1
    dx = np.concatenate([r[1] for r in results])
    ref_dx, ref_dw, _ = naive.batch_norm_backward(dy, x, mean, invstd)
    assert ulps(dx, ref_dx) <= 1 or np.allclose(dx.astype(np.float64), ref_dx,
                                                 rtol=2 ** -8, atol=1e-12)
    for _, _, rv, dw in results:
        assert rv.dtype == dw.dtype == F16
        np.testing.assert_array_equal(rv, results[0][2])  # the same on every rank
        np.testing.assert_allclose(rv.astype(np.float64), ref_rv, rtol=2 ** -10)
    np.testing.assert_allclose(sum(r[3].astype(np.float64) for r in results), ref_dw,
                               rtol=2 ** -9, atol=1e-3)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", [(4, 3, 40, 60), (700, 5)], ids=["planes", "rows"])
def test_second_moment_of_half_inputs(dtype, shape):
    """Half elements' moments are float64 sums about a pivot, as float32 ones': the batch
    variance stays within 2**-36 of the float64 one at any offset and spread (bfloat16's
    extreme ranges too, whose squares leave float32's), and a constant channel's variance
    is exactly 0."""
    rng = np.random.default_rng(11)
    # float16: 3e4 +- 3750, six spreads below 65504 (at 6e4 every channel overflowed to
    # inf, and the case checked nothing)
    big = 1e30 if dtype == BF16 else 3e4
    for loc, spread in [(0.0, 1.0), (3e3, 0.5), (big, big / 8), (1e-3, 1e-4),
                        (1e-30 if dtype == BF16 else 1e-5, 1e-32 if dtype == BF16 else 1e-6)]:
        x = half_input(rng, shape, dtype, loc, spread)
        x[:, 1] = x.flat[7]
        _, _, invstd = F.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-300)
        ref = x.astype(np.float64).var(axis=(0,) + tuple(range(2, x.ndim)))
        var = 1.0 / invstd ** 2 - 1e-300
        assert invstd[1] == 1.0 / np.sqrt(1e-300)  # the constant channel's variance is 0
        keep = ref > 0
        assert keep.sum() == ref.shape[0] - 1, loc  # every channel but the constant one
        np.testing.assert_allclose(var[keep], ref[keep], rtol=2.0 ** -36, err_msg=str(loc))
