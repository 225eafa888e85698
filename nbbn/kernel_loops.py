"""The inner loops of :mod:`nbbn.kernels`: what one task does to one span
(a 1-D piece of a plane) or one block of rows (rows layout). Loops and
nothing else.

Every span loop runs from index 0 over a 1-D view: with a start offset numba
must handle negative (wrap-around) indices and LLVM no longer vectorizes.
Statistics take one pass over memory: each block of ``BLOCK`` elements (of
rows, in the rows layout) gives its first and second moments about a pivot in
one pass (see ``PIVOT_BITS``), and block states (count, mean, M2) are merged
with Chan's formula; all accumulation is in float64. ``relu`` variants compute
``max(v, 0)`` in the same pass (NaN propagates); ``mask`` variants read a saved
ReLU output and treat the gradient as 0 where ``mask > 0`` is false, as the
ReLU backward does (every element is read and then selected: a conditional read
of 16-bit elements has no vector instruction, so it would keep the loop
scalar). A selected value is named before it is stored: numba's code for a
conditional expression written inside the call does not vectorize.
Span loops that write stream their stores past the caches when asked (``stream``).

Elements are read through ``load`` and written through ``store``
(:mod:`nbbn._half`): the same loops take float32 and float64 arrays, and the
16-bit integer views standing for float16 and bfloat16 ones, whose elements
are widened exactly and whose float64 results are rounded through float32.
The forward's output of a half array has a float32 loop of its own
(:func:`_normalize_half`).
"""
import numpy as np
from numba import njit

from ._half import fma, load, store
from ._jit import (STREAM_BYTES, at, by_element, head, row, store_fence, stream_axpb,
                   stream_grad_input, tail)

#: Elements whose second moment is taken while they sit in L1.
BLOCK = 2048
# Reductions may be reordered (so LLVM vectorizes them); NaN and Inf must
# still propagate, so no 'nnan' or 'ninf'.
_REDUCE = {"reassoc", "nsz", "contract"}


# --- span helpers: 1-D contiguous arrays, loops from 0 -----------------------

@njit(fastmath=_REDUCE, cache=True)
def _sum(x):
    acc = 0.0
    for i in range(x.shape[0]):
        acc += load(x, i)
    return acc


@njit(fastmath=_REDUCE, cache=True)
def _sum_squared_deviations(x, mean):
    acc = 0.0
    for i in range(x.shape[0]):
        d = load(x, i) - mean
        acc += d * d
    return acc


@njit(cache=True)
def _two_pass_moments(x):
    """(mean, M2) of a block: its sum, then its squared deviations from the mean."""
    mean = _sum(x) / x.shape[0]
    return mean, _sum_squared_deviations(x, mean)


# One pass over a block for both moments, about a pivot ``k``, one of its
# values: ``s1 = sum(x - k)``, ``s2 = sum((x - k)**2)``, mean ``k + s1 / n``
# and ``M2 = s2 - s1**2 / n``. The subtraction loses ``log2(s2 / M2)`` bits,
# and ``s2 / M2 = 1 + n (mean - k)**2 / M2 <= 1 + n``, since ``M2`` holds
# ``(k - mean)**2``: a few bits, and at most ``PIVOT_BITS``, past which (an outlier
# first in a block of over 1023 values), or where the sums are not finite, the
# block is read again in two passes (sum, then squared deviations from the
# mean). A constant block's M2 is 0 exactly. The second read saved made the
# statistics of float32 rows 0.80 of the time at (4096, 1024), 0.92 at (256,
# 512) (measured, 2 threads). Half elements take the same pass (for float16
# every difference is exact, and so is any sum of up to 2**12 of them, a planes
# block): it took 0.70-0.79 of the time of a float64 mean and float32 runs of
# squared deviations in rows, 0.84-0.91 in planes (measured paired, one thread,
# 2026-12-07).

#: Bits of the second moment a one-pass (pivoted) block may lose, at most.
PIVOT_BITS = 10


@njit(fastmath=_REDUCE, cache=True)
def _pivoted_sums(x, k):
    """``(sum(x - k), sum((x - k)**2))``, any order."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[0]):
        d = load(x, i) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(cache=True)
def _pivot_fine(s1, s2, m2):
    """Whether one-pass sums lost at most ``PIVOT_BITS`` of ``m2`` (and are finite)."""
    return (s2 <= 2.0 ** PIVOT_BITS * m2) & (s2 < np.inf) & (abs(s1) < np.inf)


@njit(cache=True)
def _block_moments(x):
    """``(mean, M2)`` of a block: one pivoted pass, or two where it lost too much."""
    k = load(x, 0) + 0.0
    s1, s2 = _pivoted_sums(x, k)
    m2 = s2 - s1 * (s1 / x.shape[0])
    if _pivot_fine(s1, s2, m2):
        return k + s1 / x.shape[0], m2
    return _two_pass_moments(x)


@njit(cache=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) states (Chan et al.)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    w = n_b / n
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@njit(cache=True)
def _span_moments(x):
    """(mean, M2) of a span, block by block."""
    m = x.shape[0]
    count, mean, m2 = 0.0, 0.0, 0.0
    for start in range(0, m, BLOCK):
        block = x[start:min(start + BLOCK, m)]
        block_mean, block_m2 = _block_moments(block)
        count, mean, m2 = _chan(count, mean, m2, block.shape[0], block_mean, block_m2)
    return mean, m2


@njit(fastmath=_REDUCE, cache=True)
def _grad_dot(x, dy, mask, mean):
    """sum(g) and sum(g * (x - mean)), g = dy masked by ``mask > 0`` (or not)."""
    s_dy = 0.0
    s_dyx = 0.0
    if mask is None:
        for i in range(x.shape[0]):
            g = load(dy, i) + 0.0
            s_dy += g
            s_dyx += g * (load(x, i) - mean)
    else:
        for i in range(x.shape[0]):
            g = load(dy, i) + 0.0
            g = g if load(mask, i) > 0 else 0.0
            s_dy += g
            s_dyx += g * (load(x, i) - mean)
    return s_dy, s_dyx


# No fastmath below: a fused multiply-add would turn x*a - mean*a into a
# rounding residual instead of the exact zero of a constant channel. The
# coefficients ``a, b, c, mean`` are scalars (a span of one channel) or
# float64 arrays indexed like the span (a row of the rows layout), see ``at``;
# only spans stream their stores (measured: rows are faster without).

# Inlined, as are the half loops below: the rows layout calls them once a row,
# and two calls a row cost 20% of a 1024-column float32 row (measured).
@njit(inline="always")
def _axpb(x, a, b, relu, out):
    if relu:
        for i in range(x.shape[0]):
            v = load(x, i) * at(a, i) + at(b, i)
            v = 0.0 if v < 0.0 else v
            store(out, i, v)
    else:
        for i in range(x.shape[0]):
            store(out, i, load(x, i) * at(a, i) + at(b, i))


@njit(cache=True)
def _stream_parts(out):
    """(start, end): ``out[start:end]`` starts 64-byte aligned and holds whole
    vectors of ``STREAM_BYTES``; the rest is written with plain stores."""
    n = out.shape[0]
    start = min((-out.ctypes.data) % STREAM_BYTES // out.itemsize, n)
    w = STREAM_BYTES // out.itemsize
    return start, start + (n - start) // w * w


@njit(cache=True)
def _affine_plain(x, a, b, relu, mask, out):
    """``out = x * a + b`` (ReLU'd if ``relu``; 0 where ``mask > 0`` is false
    unless ``mask`` is None)."""
    if mask is not None:
        for i in range(x.shape[0]):
            v = load(x, i) * at(a, i) + at(b, i)
            v = v if load(mask, i) > 0 else 0.0
            store(out, i, v)
    else:
        _axpb(x, a, b, relu, out)


@njit(cache=True)
def _axpb_streamed(x, a, b, relu, out):
    """:func:`_axpb` with scalar coefficients and non-temporal stores (float arrays)."""
    start, body = _stream_parts(out)
    _axpb(x[:start], a, b, relu, out[:start])
    for i in range(start, body, STREAM_BYTES // out.itemsize):
        stream_axpb(x, i, a, b, relu, out)
    _axpb(x[body:], a, b, relu, out[body:])
    store_fence()


# Non-temporal stores are float vectors: half outputs take the plain stores.
_axpb_stream = by_element(_axpb_streamed, _axpb)


@njit(cache=True)
def _affine_span(x, a, b, relu, mask, stream, out):
    """:func:`_affine_plain` with scalar coefficients, with non-temporal stores
    if ``stream`` (and no ``mask``; float arrays only)."""
    if mask is not None or not stream:
        _affine_plain(x, a, b, relu, mask, out)
    else:
        _axpb_stream(x, a, b, relu, out)


# Half outputs of the forward: float32 arithmetic, exact enough (see
# ``nbbn.kernels.half_coefficients``). A subtraction and an fma on eight lanes
# cost less than the float64 round trip (two widenings, two narrowings per
# four values) that bounds the loops above for half arrays.

@njit(inline="always")
def _normalize_half(x, k, a, r, relu, out):
    """``out = (x - k) * a + r`` in float32, the difference and the fused
    product and sum each rounded once, ReLU'd if ``relu``; coefficients
    float32 scalars or arrays indexed like the span."""
    if relu:
        for i in range(x.shape[0]):
            y = fma(load(x, i) - at(k, i), at(a, i), at(r, i))
            y = np.float32(0.0) if y < 0.0 else y
            store(out, i, y)
    else:
        for i in range(x.shape[0]):
            store(out, i, fma(load(x, i) - at(k, i), at(a, i), at(r, i)))


@njit(inline="always")
def _normalize_span_floats(x, a, b, coef, c, ok, relu, stream, out):
    _affine_span(x, a, b, relu, None, stream, out)


@njit(cache=True)
def _normalize_span_half(x, a, b, coef, c, ok, relu, stream, out):
    if ok:
        _normalize_half(x, coef[0, c], coef[1, c], coef[2, c], relu, out)
    else:
        _axpb(x, a, b, relu, out)


#: The forward's output of a span: ``x * a + b`` (scalars, float64), or for a
#: half output where ``ok``, :func:`_normalize_half` with column ``c`` of
#: ``coef``, the three float32 coefficients of each channel.
_normalize_span = by_element(_normalize_span_floats, _normalize_span_half)


@njit(inline="always")
def _normalize_row_floats(x, a, b, coef, ok, relu, out):
    _axpb(x, a, b, relu, out)


@njit(inline="always")
def _normalize_row_half(x, a, b, coef, ok, relu, out):
    if ok:
        _normalize_half(x, coef[0], coef[1], coef[2], relu, out)
    else:
        _axpb(x, a, b, relu, out)


#: :func:`_normalize_span` for a row: per-column arrays ``a``, ``b`` (float64),
#: or the tuple ``coef`` of three float32 ones.
_normalize_row = by_element(_normalize_row_floats, _normalize_row_half)


@njit(cache=True)
def _normalize_columns_floats(x, a, b, coef, ok, relu, r, lo, hi, out):
    _axpb(x[r, lo:hi], a[lo:hi], b[lo:hi], relu, out[r, lo:hi])


@njit(cache=True)
def _normalize_columns_half(x, a, b, coef, ok, relu, r, lo, hi, out):
    if ok:
        _normalize_half(x[r, lo:hi], coef[0][lo:hi], coef[1][lo:hi], coef[2][lo:hi], relu,
                        out[r, lo:hi])
    else:
        _axpb(x[r, lo:hi], a[lo:hi], b[lo:hi], relu, out[r, lo:hi])


#: :func:`_normalize_row` of columns ``lo:hi`` of row ``r`` of (R, W) arrays,
#: the coefficients being those of a whole row.
_normalize_columns = by_element(_normalize_columns_floats, _normalize_columns_half)


@njit(cache=True)
def _grad_input_plain(dy, x, mask, a, b, c, mean, out):
    if mask is None:
        for i in range(x.shape[0]):
            store(out, i, load(dy, i) * at(a, i) + (load(x, i) - at(mean, i)) * at(b, i)
                  + at(c, i))
    else:
        for i in range(x.shape[0]):
            g = load(dy, i) + 0.0
            g = g if load(mask, i) > 0 else 0.0
            store(out, i, g * at(a, i) + (load(x, i) - at(mean, i)) * at(b, i) + at(c, i))


@njit(cache=True)
def _grad_input_streamed(dy, x, mask, a, b, c, mean, out):
    """:func:`_grad_input_plain` with scalar coefficients and non-temporal
    stores (float arrays)."""
    start, body = _stream_parts(out)
    _grad_input_plain(dy[:start], x[:start], head(mask, start), a, b, c, mean, out[:start])
    for i in range(start, body, STREAM_BYTES // out.itemsize):
        stream_grad_input(dy, x, mask, i, a, b, c, mean, out)
    _grad_input_plain(dy[body:], x[body:], tail(mask, body), a, b, c, mean, out[body:])
    store_fence()


_grad_input_stream = by_element(_grad_input_streamed, _grad_input_plain)


@njit(cache=True)
def _grad_input_span(dy, x, mask, a, b, c, mean, stream, out):
    """``out = g * a + (x - mean) * b + c``, ``g`` being ``dy``, or 0 where
    ``mask > 0`` is false; scalar coefficients; non-temporal stores if
    ``stream`` (float arrays only)."""
    if not stream:
        _grad_input_plain(dy, x, mask, a, b, c, mean, out)
    else:
        _grad_input_stream(dy, x, mask, a, b, c, mean, out)


# Column sums over rows r0..r1, columns lo..lo+len(acc), of (R, W) arrays into
# float64 accumulators, four rows per visit of the accumulator.

@njit(cache=True)
def _add_columns(acc, x, r0, r1, lo):
    hi = lo + acc.shape[0]
    r = r0
    while r + 4 <= r1:
        a, b, c, d = x[r, lo:hi], x[r + 1, lo:hi], x[r + 2, lo:hi], x[r + 3, lo:hi]
        for j in range(acc.shape[0]):
            acc[j] += (load(a, j) + 0.0 + load(b, j)) + (load(c, j) + 0.0 + load(d, j))
        r += 4
    for k in range(r, r1):
        a = x[k, lo:hi]
        for j in range(acc.shape[0]):
            acc[j] += load(a, j)


@njit(cache=True)
def _add_squared_deviations(acc, r0, r1, lo, mean, x):
    hi = lo + acc.shape[0]
    r = r0
    while r + 4 <= r1:
        a, b, c, d = x[r, lo:hi], x[r + 1, lo:hi], x[r + 2, lo:hi], x[r + 3, lo:hi]
        for j in range(acc.shape[0]):
            m = mean[j]
            da, db, dc, dd = load(a, j) - m, load(b, j) - m, load(c, j) - m, load(d, j) - m
            acc[j] += (da * da + db * db) + (dc * dc + dd * dd)
        r += 4
    for k in range(r, r1):
        a = x[k, lo:hi]
        for j in range(acc.shape[0]):
            da = load(a, j) - mean[j]
            acc[j] += da * da


@njit(cache=True)
def _column_means(mean, r0, r1, lo, x):
    mean[:] = 0.0
    _add_columns(mean, x, r0, r1, lo)
    mean *= 1.0 / (r1 - r0)


@njit(cache=True)
def _two_pass_columns(mean, m2, r0, r1, lo, x):
    _column_means(mean, r0, r1, lo, x)
    m2[:] = 0.0
    _add_squared_deviations(m2, r0, r1, lo, mean, x)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _column_moments(mean, m2, r0, r1, lo, x):
    """Per column of rows ``r0:r1``, columns ``lo:lo+len(mean)`` of ``x``: the
    mean and M2 into ``mean`` and ``m2``, four rows per visit of them, in one
    pivoted pass (see ``PIVOT_BITS``), the pivot of each column being its
    value in row ``r0``; two passes again if one column needs them."""
    hi, n = lo + mean.shape[0], r1 - r0
    pivot = x[r0, lo:hi]
    mean[:] = 0.0
    m2[:] = 0.0
    r = r0
    while r + 4 <= r1:
        a, b, c, d = x[r, lo:hi], x[r + 1, lo:hi], x[r + 2, lo:hi], x[r + 3, lo:hi]
        for j in range(mean.shape[0]):
            k = load(pivot, j) + 0.0
            da, db, dc, dd = load(a, j) - k, load(b, j) - k, load(c, j) - k, load(d, j) - k
            mean[j] += (da + db) + (dc + dd)
            m2[j] += (da * da + db * db) + (dc * dc + dd * dd)
        r += 4
    for q in range(r, r1):
        a = x[q, lo:hi]
        for j in range(mean.shape[0]):
            da = load(a, j) - (load(pivot, j) + 0.0)
            mean[j] += da
            m2[j] += da * da
    bad = 0  # counted branch-free, so that the loop vectorizes
    for j in range(mean.shape[0]):
        s1, s2 = mean[j], m2[j]
        v = s2 - s1 * (s1 / n)
        m2[j], mean[j] = v, (load(pivot, j) + 0.0) + s1 / n
        bad += not _pivot_fine(s1, s2, v)
    if bad:
        _two_pass_columns(mean, m2, r0, r1, lo, x)


@njit(cache=True)
def _gradient(dy, mask, j):
    """``dy[j]`` as float64, 0 where ``mask[j] > 0`` is false (if a mask)."""
    if mask is None:
        return load(dy, j) + 0.0
    g = load(dy, j) + 0.0
    return g if load(mask, j) > 0 else 0.0


@njit(cache=True)
def _grad_input_rows(dy, x, mask, a, b, c, mean, r0, r1, lo, hi, out):
    """:func:`_grad_input_plain` of rows ``r0:r1``, columns ``lo:hi``, of (R, W)
    arrays, with per-column coefficients, two rows per visit of them (a row
    at a time, their loads bound the loop); the same arithmetic, so the same
    bits. Both rows are loaded before either is stored: where ``out`` sits at
    ``x``'s offset in a 4 KiB page (as NumPy places large arrays) and rows
    are a multiple of 1 KiB apart, a store ahead of another row's loads of
    the same column makes the core wait for it (a false dependence on the
    address's low 12 bits), and four rows a visit more lines of one L1 set
    than it holds. Measured (float32, 2 threads, ``out`` at ``x``'s offset):
    0.60-0.71 of the time of four rows at (64, 128), (128, 1024), (2048,
    256) and (4096, 1024); 0.80-0.97 at another offset."""
    w = a.shape[0]
    r = r0
    while r + 2 <= r1:
        xa, xb = x[r], x[r + 1]
        da, db = dy[r], dy[r + 1]
        ma, mb = row(mask, r, 0, w), row(mask, r + 1, 0, w)
        oa, ob = out[r], out[r + 1]
        # An unsigned index (as _run_bounds's): numba tests a signed one for
        # wraparound, which kept LLVM from vectorizing this loop.
        for j in range(np.uintp(lo), np.uintp(hi)):
            aj, bj, cj, mj = a[j], b[j], c[j], mean[j]
            va = _gradient(da, ma, j) * aj + (load(xa, j) - mj) * bj + cj
            vb = _gradient(db, mb, j) * aj + (load(xb, j) - mj) * bj + cj
            store(oa, j, va)
            store(ob, j, vb)
        r += 2
    for k in range(r, r1):
        _grad_input_plain(dy[k, lo:hi], x[k, lo:hi], row(mask, k, lo, hi), a[lo:hi],
                          b[lo:hi], c[lo:hi], mean[lo:hi], out[k, lo:hi])


@njit(cache=True)
def _add_grad_columns(s_dy, s_dyx, x, dy, mask, r0, r1, lo, mean):
    hi = lo + s_dy.shape[0]
    r = r0
    while r + 4 <= r1:
        xa, xb, xc, xd = x[r, lo:hi], x[r + 1, lo:hi], x[r + 2, lo:hi], x[r + 3, lo:hi]
        da, db, dc, dd = dy[r, lo:hi], dy[r + 1, lo:hi], dy[r + 2, lo:hi], dy[r + 3, lo:hi]
        ma, mb = row(mask, r, lo, hi), row(mask, r + 1, lo, hi)
        mc, md = row(mask, r + 2, lo, hi), row(mask, r + 3, lo, hi)
        for j in range(s_dy.shape[0]):
            ga, gb = _gradient(da, ma, j), _gradient(db, mb, j)
            gc, gd = _gradient(dc, mc, j), _gradient(dd, md, j)
            m = mean[j]
            s_dy[j] += (ga + gb) + (gc + gd)
            s_dyx[j] += ((ga * (load(xa, j) - m) + gb * (load(xb, j) - m))
                         + (gc * (load(xc, j) - m) + gd * (load(xd, j) - m)))
        r += 4
    for k in range(r, r1):
        xk, dk, mk = x[k, lo:hi], dy[k, lo:hi], row(mask, k, lo, hi)
        for j in range(s_dy.shape[0]):
            g = _gradient(dk, mk, j)
            s_dy[j] += g
            s_dyx[j] += g * (load(xk, j) - mean[j])


# --- runs: rows whose channels are runs of ``inner`` consecutive values ----------
# Run ``q`` of a row (q = 0, 1, ...) holds ``inner`` values of channel ``q %
# channels``: planes laid end to end, and (R, W) views of (N, C, inner) arrays.
# Each run takes its channel's scalar coefficients: per-column arrays of a long
# row (12544 columns at (N, 256, 7, 7)) are read from L2 for every value, and a
# call a span costs more than a short plane (measured: 2.6 times as long at
# (510, 256, 7, 7), 1.4 at (127, 256, 14, 14), one thread). Runs are indexed in
# the row, unsigned (no view: a view of a shared row costs a reference count;
# no wrap-around check, which would keep the loops scalar). The arithmetic is
# that of the loops above, so the bits are the same.

@njit(inline="always")
def _run_bounds(q, inner):
    lo = np.uintp(q) * np.uintp(inner)
    return lo, lo + np.uintp(inner)


@njit(inline="always")
def _next_channel(c, channels):
    return c + 1 if c + 1 < channels else 0


@njit(inline="always")
def _normalize_run_floats(x, lo, hi, a, b, coef, c, ok, relu, out):
    if relu:
        for i in range(lo, hi):
            v = load(x, i) * a + b
            v = 0.0 if v < 0.0 else v
            store(out, i, v)
    else:
        for i in range(lo, hi):
            store(out, i, load(x, i) * a + b)


@njit(inline="always")
def _normalize_run_half(x, lo, hi, a, b, coef, c, ok, relu, out):
    if not ok:
        _normalize_run_floats(x, lo, hi, a, b, coef, c, ok, relu, out)
        return
    k, a32, r = coef[0, c], coef[1, c], coef[2, c]
    for i in range(lo, hi):
        y = fma(load(x, i) - k, a32, r)
        if relu:
            y = np.float32(0.0) if y < 0.0 else y
        store(out, i, y)


_normalize_run = by_element(_normalize_run_floats, _normalize_run_half)


@njit(cache=True)
def _normalize_runs(x, scale, shift, coef, ok, channels, inner, relu, q0, q1, out):
    """Runs ``q0:q1`` of 1-D ``x`` normalized as :func:`_normalize_span`
    does a span: ``x * scale[c] + shift[c]``, or for a half ``out`` where
    ``ok``, :func:`_normalize_half` with column ``c`` of ``coef`` (3, C)."""
    c = q0 % channels
    for q in range(q0, q1):
        lo, hi = _run_bounds(q, inner)
        _normalize_run(x, lo, hi, scale[c], shift[c], coef, c, ok, relu, out)
        c = _next_channel(c, channels)


@njit(cache=True)
def _affine_runs(x, scale, shift, relu, mask, channels, inner, q0, q1, out):
    """Runs ``q0:q1`` of 1-D ``x`` as :func:`_affine_plain` does a span."""
    c = q0 % channels
    for q in range(q0, q1):
        lo, hi = _run_bounds(q, inner)
        a, b = scale[c], shift[c]
        if mask is None:
            _normalize_run_floats(x, lo, hi, a, b, None, c, False, relu, out)
        else:
            for i in range(lo, hi):
                v = load(x, i) * a + b
                v = v if load(mask, i) > 0 else 0.0
                store(out, i, v)
        c = _next_channel(c, channels)


@njit(cache=True)
def _grad_input_runs(dy, x, mask, a, b, c, mean, channels, inner, q0, q1, out):
    """Runs ``q0:q1`` of 1-D arrays as :func:`_grad_input_rows` does a row."""
    ch = q0 % channels
    for q in range(q0, q1):
        lo, hi = _run_bounds(q, inner)
        aj, bj, cj, mj = a[ch], b[ch], c[ch], mean[ch]
        for i in range(lo, hi):
            store(out, i, _gradient(dy, mask, i) * aj + (load(x, i) - mj) * bj + cj)
        ch = _next_channel(ch, channels)


@njit(cache=True)
def _fold_tiles(col, channels, center, out):
    """``out[c]``: the sum over tiles of ``col[t * channels + c]`` (one column
    per channel and tile), or of its squared deviation from ``center[c]``
    unless ``center`` is None; tiles in order, from 0. In place: no
    temporaries (a rows task's bookkeeping was most of a short task's time)."""
    for c in range(channels):
        out[c] = 0.0
    for t in range(col.shape[0] // channels):
        tile = col[t * channels:(t + 1) * channels]
        if center is None:
            for c in range(channels):
                out[c] += tile[c]
        else:
            for c in range(channels):
                out[c] += (tile[c] - center[c]) * (tile[c] - center[c])


@njit(cache=True)
def _fold_columns(col, channels, inner, center):
    """Per channel, the sum over its ``tiles * inner`` columns of ``col``, or
    of ``(col - center[c])**2`` unless ``center`` is None; tiles in order."""
    out = np.zeros(channels)
    if inner == 1:  # one column per channel and tile: what the span loops give
        _fold_tiles(col, channels, center, out)
        return out
    tiles = col.shape[0] // (channels * inner)
    j = 0
    for _ in range(tiles):
        for c in range(channels):
            if center is None:
                out[c] += _sum(col[j:j + inner])
            else:
                out[c] += _sum_squared_deviations(col[j:j + inner], center[c])
            j += inner
    return out


@njit(cache=True)
def _expand(values, channels, inner, width):
    """Per-channel ``values`` repeated for each of the ``width`` columns of a rows view."""
    return _expand_rows(values.reshape((1, values.shape[0])), channels, inner, width)[0]


@njit(cache=True)
def _expand_rows(values, channels, inner, width):
    """:func:`_expand` of each row of ``values`` (K, C): (K, ``width``); the
    first tile filled, then copied in doubling runs (vectorized copies:
    element by element, 5 rows of 1024 took 4.5 us, now 1.1)."""
    t = channels * inner
    out = np.empty((values.shape[0], width), values.dtype)
    for q in range(values.shape[0]):
        o, v = out[q], values[q]
        if inner == 1:
            for i in range(t):
                o[i] = v[i]
        else:
            for c in range(channels):
                for i in range(c * inner, c * inner + inner):
                    o[i] = v[c]
        filled = t
        while filled < width:
            run = o[filled:filled + min(filled, width - filled)]
            for i in range(run.shape[0]):
                run[i] = o[i]
            filled += run.shape[0]
    return out
