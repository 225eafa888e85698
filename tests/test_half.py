"""The kernels' half-precision conversions (nbbn/_half.py) against NumPy's float16 casts
and ml_dtypes' bfloat16 casts: widening over every 16-bit pattern; narrowing over every
float32 within two ulps of each rounding boundary (the midpoints between neighbouring half
values), a dense sweep of all float32 bit patterns, and float64 values near the boundaries,
where a double rounding through float32 would go wrong (and ``nearest``, which rounds
them once). Then the forward's float32 normalization of half inputs, over every 16-bit
pattern, against float64 rounded once."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from nbbn import _half as half
from nbbn._half import f16_to_f32, f32_to_f16, load, store
from nbbn._validation import kernel_view
from nbbn.kernel_loops import _normalize_half
from nbbn.kernels import HALF_LIMIT, _half_coefficients_half
from test_half_layers import LARGEST, ordered

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 is an optional extra: pip install "nbbn[bfloat16]"
    BF16 = None
F16 = np.dtype(np.float16)
HALVES = [F16, pytest.param(BF16, marks=pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes"))]
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@njit
def _widen(a, out):
    for i in range(a.shape[0]):
        out[i] = load(a, i)


@njit
def _narrow(x, out):
    for i in range(x.shape[0]):
        store(out, i, x[i])


def widen(bits, dtype):
    out = np.empty(bits.shape[0], np.float32)
    _widen(kernel_view(bits.view(dtype)), out)
    return out


def narrow(x, dtype):
    out = np.empty(x.shape[0], dtype)
    _narrow(x, kernel_view(out))
    return out


def assert_same_bits(actual, expected):
    """Equal bit patterns, except that any NaN matches any NaN of the same sign."""
    a, e = actual.view(np.uint16), expected.view(np.uint16)
    nan = np.isnan(expected.astype(np.float32))
    assert np.array_equal(np.isnan(actual.astype(np.float32)), nan)
    assert np.array_equal(a >> 15, e >> 15)
    bad = np.flatnonzero((a != e) & ~nan)
    assert bad.size == 0, [(hex(e[i]), hex(a[i])) for i in bad[:5]]


@pytest.mark.parametrize("dtype", HALVES, ids=["float16", "bfloat16"])
def test_widening_is_exact_for_every_pattern(dtype):
    expected = ALL16.view(dtype).astype(np.float32)
    assert_same_bits_32(widen(ALL16, dtype), expected)


def assert_same_bits_32(actual, expected):
    """Equal float32 bit patterns, except that any NaN matches any NaN of the same
    sign (hardware conversions quiet signalling NaNs; NumPy keeps their payload)."""
    a, e = actual.view(np.uint32), expected.view(np.uint32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(a >> 31, e >> 31)
    np.testing.assert_array_equal(a[~nan], e[~nan])


@njit
def _soft(bits, x, wide, narrow):
    for i in range(bits.shape[0]):
        wide[i] = f16_to_f32(bits[i])
    for i in range(x.shape[0]):
        narrow[i] = f32_to_f16(x[i])


def test_float16_without_hardware_conversion(monkeypatch):
    """The integer float16 conversions, which targets without F16C compile: called
    directly, and through load and store compiled as for such a target."""
    x = np.concatenate([_boundaries(F16), np.float32([1e-8, -3e-6, 70000.0])])
    wide, narrow = np.empty(ALL16.size, np.float32), np.empty(x.size, np.uint16)
    _soft(ALL16, x, wide, narrow)
    assert_same_bits_32(wide, ALL16.view(F16).astype(np.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        assert_same_bits(narrow.view(F16), x.astype(F16))
    # the intrinsics load and store call, compiled now as for a target without F16C
    # (their code is made where they are called; load's and store's own are cached)
    monkeypatch.setattr(half, "hardware_float16", lambda context=None: False)
    wide, narrow = np.empty(ALL16.size, np.float32), np.empty(x.size, np.uint16)
    njit(_through_intrinsics)(ALL16, x, wide, narrow)
    assert_same_bits_32(wide, ALL16.view(F16).astype(np.float32))
    assert (wide.view(np.uint32)[ALL16 == 0x7C01] == 0x7F802000).all()  # NaN kept as is
    with np.errstate(over="ignore", invalid="ignore"):
        assert_same_bits(narrow.view(F16), x.astype(F16))


def _through_intrinsics(bits, x, wide, narrow):
    for i in range(bits.shape[0]):
        wide[i] = half._widen(bits[i])
    for i in range(x.shape[0]):
        narrow[i] = half._narrow(x[i], narrow)


def _boundaries(dtype):
    """float32 values at and within two ulps of every rounding boundary of ``dtype``:
    the midpoints between neighbouring finite values, the largest value and beyond."""
    with np.errstate(invalid="ignore"):
        values = ALL16.view(dtype).astype(np.float64)
    finite = np.sort(np.unique(values[np.isfinite(values)]))
    mid = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 24 bits suffice
    top = finite[-1] + (finite[-1] - finite[-2]) / 2  # where rounding reaches inf
    points = np.concatenate([mid, finite.astype(np.float32), np.float32([top])])
    bits = points.view(np.uint32).astype(np.int64)
    near = (bits[:, None] + np.arange(-2, 3)).ravel()
    near = near[(near >= 0) & (near < 1 << 32)].astype(np.uint32).view(np.float32)
    special = np.float32([np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-45, 0, -0.0])
    return np.concatenate([near, special])


@pytest.mark.parametrize("dtype", HALVES, ids=["float16", "bfloat16"])
def test_narrowing_float32_rounds_to_nearest_even(dtype):
    # every boundary, then a dense sweep of the float32 bit patterns (2**20 of them)
    sweep = (np.arange(1 << 20, dtype=np.uint64) * 4093 + 12345).astype(np.uint32)
    for x in (_boundaries(dtype), sweep.view(np.float32)):
        with np.errstate(over="ignore", invalid="ignore"):
            assert_same_bits(narrow(x, dtype), x.astype(dtype))


def _value(bits, dtype):
    """float64 values of half ``bits``; inf stands at the place the next power of two
    would have (2**16 for float16, 2**128 for bfloat16), where rounding sends to it."""
    v = bits.astype(np.uint16).view(dtype).astype(np.float64)
    limit = 2.0 ** 16 if dtype == F16 else 2.0 ** 128
    return np.where(np.isinf(v), np.sign(v) * limit, v)


def _correctly_rounded(x, dtype):
    """float64 ``x`` rounded once to ``dtype``, to nearest even: of the neighbours of a
    first guess, the nearest (the differences are exact, Sterbenz), the even one on a tie."""
    with np.errstate(over="ignore"):
        guess = x.astype(np.float32).astype(dtype).view(np.uint16).astype(np.int64)
    best = guess.copy()
    sign = np.where(guess & 0x8000, -1, 1)
    for step in (-1, 1):
        other = guess + step * sign  # the neighbour in magnitude
        ok = ((other & 0x7FFF) <= 0x7F80 if dtype == BF16 else (other & 0x7FFF) <= 0x7C00)
        ok &= (other & 0x7FFF) >= 0  # not across zero
        cand = _value(np.where(ok, other, guess), dtype)
        cur = _value(best, dtype)
        with np.errstate(invalid="ignore"):
            d_new, d_cur = np.abs(cand - x), np.abs(cur - x)
        take = ok & ((d_new < d_cur) | ((d_new == d_cur) & ((other & 1) == 0)))
        best = np.where(take, other, best)
    return best.astype(np.uint16).view(dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=["float16", "bfloat16"])
def test_narrowing_float64_goes_through_float32(dtype):
    """A float64 value is rounded to float32, then to the half type: the correctly
    rounded value but where the float32 lands on a half tie, and 1 ulp from it there."""
    rng = np.random.default_rng(5)
    mid = _boundaries(dtype).astype(np.float64)
    mid = mid[np.isfinite(mid)]
    # just off each boundary by less than a float32 ulp: where the two roundings differ
    ulp32 = np.abs(mid) * 2.0 ** -30 + 1e-300
    wide = np.concatenate([mid - ulp32, mid + ulp32, mid,
                           rng.standard_normal(1 << 16) * 10.0 ** rng.uniform(-10, 6, 1 << 16)])
    with np.errstate(over="ignore"):
        twice = wide.astype(np.float32).astype(dtype)
    actual = narrow(wide, dtype)
    assert_same_bits(actual, twice)
    once = _correctly_rounded(wide, dtype)
    differ = actual.view(np.uint16) != once.view(np.uint16)
    assert differ.any()  # the inputs do reach the ties
    finite = np.isfinite(once.astype(np.float32))
    steps = np.abs(actual.view(np.uint16).astype(np.int64) - once.view(np.uint16).astype(np.int64))
    assert steps[finite].max() <= 1
    with np.errstate(invalid="ignore"):
        values = ALL16.view(dtype).astype(np.float64)
    finite_values = np.sort(np.unique(values[np.isfinite(values)]))
    top = finite_values[-1] + (finite_values[-1] - finite_values[-2]) / 2  # ties with inf
    ties = np.concatenate([(finite_values[:-1] + finite_values[1:]) / 2, [-top, top]])
    assert np.isin(wide.astype(np.float32).astype(np.float64)[differ], ties).all()



@njit
def _nearest(x, a):
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = half.nearest(x[i], a)
    return out


@pytest.mark.parametrize("dtype", HALVES, ids=["float16", "bfloat16"])
def test_nearest_rounds_float64_once_and_saturates(dtype):
    """``nearest`` (the forward's zero points): float64 rounded once, where the
    narrowing above can land on a tie, and saturated at the type's largest
    finite value; NaN stays NaN."""
    rng = np.random.default_rng(6)
    mid = _boundaries(dtype).astype(np.float64)
    mid = mid[np.isfinite(mid)]
    ulp32 = np.abs(mid) * 2.0 ** -30 + 1e-300
    wide = np.concatenate([mid - ulp32, mid + ulp32, mid, [1e300, -1e300, np.inf, -np.inf],
                           rng.standard_normal(1 << 16) * 10.0 ** rng.uniform(-10, 6, 1 << 16)])
    top = LARGEST[dtype.name]
    expected = _correctly_rounded(np.clip(wide, -top, top), dtype).astype(np.float32)
    np.testing.assert_array_equal(_nearest(wide, kernel_view(np.empty(0, dtype))), expected)
    assert np.isnan(_nearest(np.array([np.nan]), kernel_view(np.empty(0, dtype)))).all()

def test_float_arrays_pass_through():
    x = np.array([1.5, -2.25, np.nan], np.float64)
    out = np.empty(3, np.float32)
    _narrow(x, out)
    np.testing.assert_array_equal(out, x.astype(np.float32))
    assert kernel_view(out) is out


# --- the forward's float32 normalization (kernels.half_coefficients) ------------------

def _half_coefficient(m, a, beta, dtype=F16):
    """``(k, a32, r, ok)`` of one channel: mean ``m``, scale ``a``, bias ``beta``."""
    coef, ok = _half_coefficients_half(np.array([m], np.float64), float(a),
                                       np.array([beta], np.float64),
                                       kernel_view(np.empty(0, dtype)))
    return (*coef[:, 0], ok)


def normalize32(x, m, a, beta, relu=False):
    """``(x - m) * a + beta`` of half ``x`` by the forward's float32 loop; None
    where its coefficients say that the float64 loop must run instead."""
    *coefficients, ok = _half_coefficient(m, a, beta, x.dtype)
    if not ok:
        return None
    out = np.empty_like(x)
    _normalize_half(kernel_view(x), *np.float32(coefficients), relu, kernel_view(out))
    return out


@pytest.mark.parametrize("dtype", HALVES)
@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_float32_normalization_over_every_half_value(dtype, data):
    """Every 16-bit pattern, mean and scale with ``|mean * scale|`` up to a
    quarter of HALF_LIMIT, any sign: within 1 ulp of the float64 result
    rounded once (bfloat16: where that result is at least 2**-22, and within
    2**-30 below), the infinities and NaNs of the float64 result, and exact
    zeros where ``x == mean`` and the bias is 0."""
    top = min(LARGEST[dtype.name], 9e35)  # 1e36 at most once rounded to the type
    m = data.draw(st.floats(-top, top), label="mean")
    a = data.draw(st.floats(-HALF_LIMIT, HALF_LIMIT), label="scale") / max(1.0, abs(m)) / 4
    zero_bias = data.draw(st.booleans(), label="bias 0")
    beta = 0.0 if zero_bias else data.draw(st.floats(-HALF_LIMIT / 8, HALF_LIMIT / 8))
    if data.draw(st.booleans(), label="mean is a value of the type"):
        m = float(np.array(m).astype(dtype))
    x = ALL16.view(dtype)
    with np.errstate(invalid="ignore"):
        x64 = x.astype(np.float64)
    if 0 < abs(a) < 2.0 ** -100:
        assert not _half_coefficient(m, a, beta, dtype)[-1]  # a32 would be subnormal
        a = 0.0
    y = normalize32(x, m, a, beta)
    assert y is not None
    with np.errstate(invalid="ignore", over="ignore"):
        ref = (x64 - m) * a + beta
        expected = ref.astype(dtype)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(y.astype(np.float32)), nan)
    off = np.abs(ordered(y) - ordered(expected))
    if dtype == F16:
        assert off[~nan].max() <= 1
    else:
        tiny = np.abs(ref) < 2.0 ** -22
        assert off[~nan & ~tiny].max(initial=0) <= 1
        assert np.all(np.abs(y[tiny].astype(np.float64) - ref[tiny]) <= 2.0 ** -30)
    if zero_bias:
        assert not y[x64 == m].astype(np.float32).any()  # exactly 0


def test_float32_normalization_refuses_what_it_cannot_bound():
    """Past HALF_LIMIT, a non-finite coefficient, a scale whose float32 is not
    normal, or a zero of ``y`` where ``x - k`` could overflow float32: the
    float64 loop runs instead (ok is False)."""
    assert _half_coefficient(3.0, 0.5, 0.25)[-1]
    assert not _half_coefficient(2000.0, 316.0, 0.0)[-1]  # a constant channel far from 0
    assert not _half_coefficient(3.0, 0.5, HALF_LIMIT)[-1]
    assert not _half_coefficient(3.0, np.inf, 0.0)[-1]
    assert not _half_coefficient(np.nan, 0.5, 0.0)[-1]
    assert not _half_coefficient(0.0, 2.0 ** 101, 0.0)[-1]
    assert not _half_coefficient(1e37, 1e-40, 0.0)[-1]
    if BF16 is not None:
        assert _half_coefficient(1e35, 1e-30, 0.0, BF16)[-1]
        assert not _half_coefficient(1e37, 1e-30, 0.0, BF16)[-1]


@pytest.mark.parametrize("m, a, beta", [(0.25, 1 / 3, -0.125), (0.25, -2.0, 0.5),
                                        (7.0, 1e-3, 100.0), (-7.0, -1e-3, 100.0)])
def test_float32_normalization_zero_point_and_relu(m, a, beta):
    """``k`` is the float16 value nearest to where ``y`` is 0, saturating at the
    type's range (-1e5 and 1e5 in the last two cases); with the ReLU clamping
    in float32, every output is within 1 ulp."""
    k, a32, r, ok = _half_coefficient(m, a, beta)
    assert ok and k == np.float32(np.float16(np.clip(m - beta / a, -65504, 65504)))
    assert r == np.float32((k - m) * a + beta) and a32 == np.float32(a)
    x = ALL16.view(F16)
    for relu in (False, True):
        y = normalize32(x, m, a, beta, relu=relu)
        with np.errstate(invalid="ignore", over="ignore"):
            ref = (x.astype(np.float64) - m) * a + beta
            ref = np.maximum(ref, 0) if relu else ref
            expected = ref.astype(F16)
        nan = np.isnan(ref)
        assert np.abs(ordered(y) - ordered(expected))[~nan].max() <= 1
