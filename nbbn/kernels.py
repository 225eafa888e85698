"""Numba CPU kernels for batch normalization: loops and nothing else (the
inner loops, per span or block of rows, are in :mod:`nbbn.kernel_loops`).

Two memory layouts cover every input (see ``nbbn._engine.layout_of``):

* planes: ``x`` viewed as ``(N, C, M)``; one task per chunk of an ``(n, c)``
  plane, so that few channels still keep every core busy;
* rows: ``x`` viewed as ``(R, W)`` with ``W = T * C * M`` columns, channel of
  column ``j`` is ``(j // M) % C``; one statistics task per chunk of rows
  (``parts`` chunks of nearly equal sizes) and block of channels, with
  per-column partial states folded to per-channel states inside the task.

Outputs are written by chunk of a plane, or by row (a block of columns of a
long one, see ``ROW_TASK``) with per-column coefficients; where a row's
channels are runs of several values (rows of ``(N, C, M)`` inputs, short
planes) by *channel runs*, each run with its channel's scalar coefficients
(see ``RUN_WIDTH``).

The chunks whose partial states are merged are fixed by the shape, never by
the thread count, and merged serially in order; what a team of threads may
add (blocks of channels, a task per channel) only splits independent
columns or whole channels. So results are bitwise reproducible for any
``numba.set_num_threads``.

The passes over the data (``_*_pass``) are inlined into the kernels, so that
one call does a whole forward or backward (``*_train``, ``*_eval``,
``*_backward``: one dispatch, the per-channel arithmetic in between). For
small planes inputs each task can take a whole channel (``by_channel``):
statistics and output in one parallel region, the channel still in the
cache. The single passes stay kernels of their own for the layers that work
between them (synchronized statistics, Batch Renormalization). Every parallel kernel has a
``*_serial`` twin (same code, ``prange`` run as ``range``; no thread launch,
for small inputs): same tasks, same order, same bits.
"""
import numpy as np
from numba import njit, prange

from ._half import float_empty, nearest
from ._jit import at, by_element, parallel_kernel, plane_rows, row, serial_twin, span, tail
from .kernel_loops import (_add_grad_columns, _affine_plain, _affine_runs, _affine_span,
                           _column_moments, _expand, _expand_rows, _fold_columns, _fold_tiles,
                           _grad_dot, _grad_input_rows, _grad_input_runs, _grad_input_span,
                           _normalize_columns, _normalize_row, _normalize_runs, _normalize_span,
                           _span_moments)


# --- per channel -------------------------------------------------------------

@njit(cache=True)
def merge_moments(counts, means, m2s):
    """Merge partial states ``(counts[p], means[p, :], m2s[p, :])`` in order."""
    n_parts, channels = means.shape
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    n = 0.0
    for p in range(n_parts):
        n_b = counts[p]
        if n_b == 0:
            continue
        total = n + n_b
        w = n_b / total
        f = n * w
        for c in range(channels):
            delta = means[p, c] - mean[c]
            mean[c] += delta * w
            m2[c] += m2s[p, c] + delta * delta * f
        n = total
    return mean, m2


@njit(cache=True)
def _mean_var(counts, means, m2s):
    """(mean, biased variance) from the partial states, merged in order."""
    mean, m2 = merge_moments(counts, means, m2s)
    return mean, m2 / counts.sum()


@njit(cache=True)
def _sum_parts(parts):
    """Column sums of ``parts`` (P, C), adding the rows in order."""
    out = np.zeros(parts.shape[1])
    for p in range(parts.shape[0]):
        for c in range(parts.shape[1]):
            out[c] += parts[p, c]
    return out


# error_model="numpy" where a loop over channels divides: Python's model checks
# every divisor for zero, a branch that keeps the loop scalar (1024 channels'
# coefficients took 3.9 us, now 1.1; the same IEEE results, and eps > 0).

@njit(cache=True, error_model="numpy")
def _coefficient(mean, var, weight, bias, eps, c):
    """``(invstd, scale, shift)`` of channel ``c``: ``y = x * scale + shift``."""
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if weight is None else weight[c] * invstd
    shift = -mean * scale if bias is None else bias[c] - mean * scale
    return invstd, scale, shift


@njit(cache=True, error_model="numpy")
def coefficients(mean, var, weight, bias, eps):
    """``(invstd, scale, shift)`` of ``y = x * scale + shift`` per channel;
    ``weight``, ``bias`` may be None; float32 values are widened exactly."""
    invstd, scale, shift = np.empty(mean.shape[0]), np.empty(mean.shape[0]), np.empty(mean.shape[0])
    for c in range(mean.shape[0]):
        invstd[c], scale[c], shift[c] = _coefficient(mean[c] + 0.0, var[c] + 0.0, weight, bias,
                                                     eps, c)
    return invstd, scale, shift


#: Half outputs are computed in float32 where ``|mean * scale| + 2 |bias|`` is
#: at most this (see :func:`half_coefficients`), in float64 elsewhere.
HALF_LIMIT = 2.0 ** 19


@njit(cache=True)
def _half_coefficients_floats(mean, scale, bias, out):
    return None, False


@njit(cache=True, error_model="numpy")
def _half_coefficients_half(mean, scale, bias, out):
    """For each channel ``c``, float32 ``k, a32, r`` with which ``(x - k) * a32
    + r``, the difference and the fused product and sum each rounded once to
    float32, is ``y = (x - m) * a + beta`` (float64 ``m = mean[c]``, ``a =
    scale[c]`` or ``scale``, ``beta = bias[c]`` or 0) for any ``x`` of
    ``out``'s half type, if the channel is fine:

    * ``k`` is the value of the type nearest to ``z = m - beta / a``, where
      ``y`` is 0 (saturating; ``m`` if ``a`` is 0), and ``r = (k - m) * a +
      beta``: for ``x`` other than ``k``, ``|x - z| >= |k - z|``, so ``|r| <=
      |y|`` and ``|(x - k) a| <= 2 |y|``, and every rounding is relative to
      ``y``; for ``x == k``, ``y`` is ``r``. Where ``x == m`` (a constant
      channel) and ``beta == 0``, ``k`` is ``m``, ``r`` is 0, and so is ``y``;
    * the error is at most about ``2**-21 |y| + 2**-50 (|m a| + 2 |beta|)``,
      within 1 ulp of a half ``y`` where the second term is below 2**-31
      (``HALF_LIMIT``): every float16 output, and bfloat16's down to 2**-22;
    * ``|k| <= 1e36``: ``x - k`` cannot overflow for a bfloat16 ``x``; ``a``
      is 0 or between 2**-100 and 2**100: ``a32`` is a normal number.

    Branch-free, so that the loop vectorizes (a call's setup was a third of
    a (256, 512) evaluation: measured)."""
    n = mean.shape[0]
    coef = np.empty((3, n), np.float32)
    bad = 0
    for c in range(n):
        m, a = mean[c] + 0.0, at(scale, c)
        beta = 0.0 if bias is None else bias[c] + 0.0
        k = nearest(m - beta / a if a != 0.0 else m, out)
        r = (k - m) * a + beta
        coef[0, c], coef[1, c], coef[2, c] = k, a, r
        bad += not (np.isfinite(r) & (abs(k) <= 1e36)
                    & ((a == 0.0) | ((abs(a) >= 2.0 ** -100) & (abs(a) <= 2.0 ** 100)))
                    & (abs(m * a) + 2.0 * abs(beta) <= HALF_LIMIT))
    return coef, bad == 0


#: ``(coef, ok)``: for a half ``out``, the rows ``k, a32, r`` (3, C) float32 of
#: :func:`_half_coefficients_half` for every channel (``scale`` an array or
#: one value), and whether all are ``ok`` (else the call computes in float64);
#: ``(None, False)`` for float outputs, so that the loops over the data carry
#: nothing more for them (an array would cost its reference count in every
#: task: 7% of a float32 evaluation of (4096, 1024), measured).
half_coefficients = by_element(_half_coefficients_floats, _half_coefficients_half)


@njit(cache=True, error_model="numpy")
def _grad_coefficient(s_dy, s_dyx, invstd, weight, count, c):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` for channel ``c``."""
    a = invstd if weight is None else weight[c] * invstd
    return a, -a * invstd * (s_dyx * invstd) / count, -a * s_dy / count


@njit(cache=True, error_model="numpy")
def backward_coefficients(s_dy, s_dyx, invstd, weight, count):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` per channel, for
    batch statistics over ``count`` values; ``weight`` may be None."""
    a, b, c = np.empty(s_dy.shape[0]), np.empty(s_dy.shape[0]), np.empty(s_dy.shape[0])
    for k in range(s_dy.shape[0]):
        a[k], b[k], c[k] = _grad_coefficient(s_dy[k], s_dyx[k], invstd[k], weight, count, k)
    return a, b, c


@njit(cache=True)
def _input_gradient(s_dy, s_dyx, invstd, weight, count, training):
    """``(a, b, c)`` of the input gradient: ``dy * a + (x - mean) * b + c``
    through batch statistics (``training``); else ``dy * a + b`` with ``a =
    weight * invstd`` (or ``invstd``) and ``b`` zeros (fixed statistics)."""
    if training:
        return backward_coefficients(s_dy, s_dyx, invstd, weight, count)
    a = invstd.copy() if weight is None else weight * invstd
    return a, np.zeros(a.shape[0]), np.zeros(a.shape[0])


@njit(cache=True)
def update_running(running_mean, running_var, mean, unbiased_var, factor):
    """Exponential moving average of the statistics, in place, unless one of
    ``mean``, ``unbiased_var`` is not finite; return whether it updated."""
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(unbiased_var[c])):
            return False
    for c in range(running_mean.shape[0]):
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * unbiased_var[c]
    return True


@njit(cache=True)
def _track(running_mean, running_var, mean, var, count, factor):
    """:func:`update_running` with the unbiased variance, if there are running
    statistics (empty arrays: none)."""
    if running_mean.shape[0] == 0:
        return False
    return update_running(running_mean, running_var, mean, var * (count / (count - 1)), factor)


@njit(cache=True)
def _cast_gradients(s_dy, s_dyx, invstd, dtype_like):
    """``(dweight, dbias) = (s_dyx * invstd, s_dy)`` in the dtype of ``dtype_like``
    (float32 for a half one)."""
    dweight = float_empty(s_dy.shape[0], dtype_like)
    dbias = float_empty(s_dy.shape[0], dtype_like)
    for c in range(s_dy.shape[0]):
        dweight[c] = s_dyx[c] * invstd[c]
        dbias[c] = s_dy[c]
    return dweight, dbias


# --- tasks -------------------------------------------------------------------

@njit(cache=True)
def _n_chunks(m, chunk):
    return (m + chunk - 1) // chunk


@njit(cache=True)
def _plane_task(t, shape, chunk):
    """(n, c, lo, hi, part) of planes task ``t``."""
    channels, m = shape[1], shape[2]
    k_chunks = _n_chunks(m, chunk)
    n = t // (channels * k_chunks)
    lo = (t % k_chunks) * chunk
    return n, (t // k_chunks) % channels, lo, min(lo + chunk, m), n * k_chunks + t % k_chunks


@njit(cache=True)
def _row_block(t, x, parts, channels, inner, blocks):
    """(p, r0, r1, c0, c1, segments, width) of rows task ``t``: chunk ``p`` of
    ``parts`` chunks of nearly equal sizes, rows ``r0:r1``, channels ``c0:c1``;
    the block's columns are ``segments`` runs of ``width`` (one run of the
    whole row when it has every channel)."""
    p, q = t // blocks, t % blocks
    r0, r1 = p * x.shape[0] // parts, (p + 1) * x.shape[0] // parts
    c0, c1 = q * channels // blocks, (q + 1) * channels // blocks
    if blocks == 1:
        return p, r0, r1, 0, channels, 1, x.shape[1]
    return p, r0, r1, c0, c1, x.shape[1] // (channels * inner), (c1 - c0) * inner


@njit(cache=True)
def _row_moments_task(t, x, parts, channels, inner, blocks, means, m2s):
    p, r0, r1, c0, c1, segments, width = _row_block(t, x, parts, channels, inner, blocks)
    stride = channels * inner
    col_mean, col_m2 = np.empty(segments * width), np.empty(segments * width)
    for s in range(segments):
        _column_moments(col_mean[s * width:(s + 1) * width], col_m2[s * width:(s + 1) * width],
                        r0, r1, s * stride + c0 * inner, x)
    # Fold the tiles * inner columns of each channel: equal counts.
    tiles = x.shape[1] // stride
    if inner == 1:
        mean, m2, spread = means[p, c0:c1], m2s[p, c0:c1], col_m2[:c1 - c0]
        _fold_tiles(col_mean, c1 - c0, None, mean)
        for c in range(c1 - c0):
            mean[c] = mean[c] / tiles
        _fold_tiles(col_m2, c1 - c0, None, m2)
        _fold_tiles(col_mean, c1 - c0, mean, spread)  # col_m2 is folded: reuse it
        for c in range(c1 - c0):
            m2[c] = m2[c] + (r1 - r0) * spread[c]
        return
    ch_mean = _fold_columns(col_mean, c1 - c0, inner, None) / (tiles * inner)
    means[p, c0:c1] = ch_mean
    m2s[p, c0:c1] = (_fold_columns(col_m2, c1 - c0, inner, None)
                     + (r1 - r0) * _fold_columns(col_mean, c1 - c0, inner, ch_mean))


@njit(cache=True)
def _row_grad_sums_task(t, x, dy, mask, mean, parts, channels, inner, blocks,
                        s_dy, s_dyx):
    p, r0, r1, c0, c1, segments, width = _row_block(t, x, parts, channels, inner, blocks)
    stride = channels * inner
    col_dy = np.zeros(segments * width)
    col_dyx = np.zeros(segments * width)
    for s in range(segments):
        lo = s * stride + c0 * inner
        _add_grad_columns(col_dy[s * width:(s + 1) * width], col_dyx[s * width:(s + 1) * width],
                          x, dy, mask, r0, r1, lo, mean[lo:lo + width])
    if inner == 1:
        _fold_tiles(col_dy, c1 - c0, None, s_dy[p, c0:c1])
        _fold_tiles(col_dyx, c1 - c0, None, s_dyx[p, c0:c1])
        return
    s_dy[p, c0:c1] = _fold_columns(col_dy, c1 - c0, inner, None)
    s_dyx[p, c0:c1] = _fold_columns(col_dyx, c1 - c0, inner, None)


# --- passes over the data (inlined into the kernels) ---------------------------

@njit(inline="always")
def _plane_moments_pass(x, chunk):
    parts = x.shape[0] * _n_chunks(x.shape[2], chunk)
    means = np.empty((parts, x.shape[1]))
    m2s = np.empty((parts, x.shape[1]))
    for t in prange(parts * x.shape[1]):
        n, c, lo, hi, part = _plane_task(t, x.shape, chunk)
        means[part, c], m2s[part, c] = _span_moments(x[n, c, lo:hi])
    return means, m2s


@njit(inline="always")
def _row_moments_pass(x, parts, channels, inner, blocks):
    means = np.empty((parts, channels))
    m2s = np.empty((parts, channels))
    for t in prange(parts * blocks):
        _row_moments_task(t, x, parts, channels, inner, blocks, means, m2s)
    return means, m2s


# Passes that write an output by channel runs (kernel_loops' runs): wide rows
# views of (N, C, inner) arrays, and planes shorter than RUN_MAX not streamed;
# elsewhere by spans of planes, or rows with per-column coefficient arrays. A
# task of runs has about RUN_TASK values of one row; outputs depend on no task
# boundary.

#: Rows views are written by runs where their channels are runs of at least
#: RUN_MIN values (twice as many for the input gradient) and the row is at least
#: RUN_WIDTH values wide; elsewhere per-column coefficient arrays cost less: a
#: narrower row's stay in L1 (2 x 3072 float64 are 48 KiB), and a shorter run is
#: mostly a scalar remainder of the vector loop. Measured, one thread, float32,
#: runs against arrays, training/evaluation/backward: (64, 512, 3, 3)
#: 1.02/1.03/1.26, (256, 64, 4, 4) 1.29/1.56/1.09, (64, 256, 4, 4)
#: 0.79/0.66/0.95, (64, 256, 5, 5) 0.75/0.61/1.08, (64, 256, 6, 6)
#: 0.79/0.68/0.88, (64, 64, 7, 7) 0.79/0.66/0.93.
RUN_MIN = 16
RUN_WIDTH = 3072
#: Planes shorter than this are written by runs: a call a span cost 2.6 times
#: the time at 8 x 8, 1.4 at 14 x 14, 1.05 at 28 x 28 (measured, one thread).
RUN_MAX = 1024
#: Values of a task of runs, about.
RUN_TASK = 1 << 13


@njit(inline="always")
def _by_runs(x, stream):
    """Whether planes ``x`` (N, C, M) are written by runs."""
    return x.shape[2] < RUN_MAX and not stream


@njit(inline="always")
def _rows_by_runs(x, inner, shortest=RUN_MIN):
    """Whether rows ``x`` (R, W) of runs of ``inner`` values are written by
    runs, where runs of ``shortest`` values pay."""
    return inner >= shortest and x.shape[1] >= RUN_WIDTH


#: Values of a task of the rows layout's output passes at most (a row of the
#: forward, four rows of the input gradient), where its rows are longer: their
#: columns are then cut into blocks, so that an input of a few long rows still
#: gives each thread of a team (32768 values a thread at least) two tasks.
#: Each value's arithmetic is the same whatever the block, so the bits are too.
ROW_TASK = 1 << 14


@njit(inline="always")
def _column_blocks(x, rows):
    """``(blocks, span)``: the columns of ``rows`` rows of ``x`` (R, W) cut
    into ``blocks`` of ``span`` columns (the last may be shorter; a multiple
    of 16: whole vectors) for at most ``ROW_TASK`` values a task, or one block."""
    w = x.shape[1]
    span = -(-w // max(1, -(-rows * w // ROW_TASK)))
    span = -(-span // 16) * 16
    return -(-w // span), span


@njit(inline="always")
def _run_tasks(x, inner):
    """``(runs, per_task, tasks)``: runs a row of ``x`` (R, W), runs a task,
    tasks a row."""
    runs = x.shape[1] // inner
    per_task = max(1, RUN_TASK // inner)
    return runs, per_task, (runs + per_task - 1) // per_task


@njit(inline="always")
def _runs_affine_pass(x, scale, shift, channels, inner, relu, mask, out):
    runs, per, k = _run_tasks(x, inner)
    for t in prange(x.shape[0] * k):
        r, q0 = t // k, t % k * per
        _affine_runs(x[r], scale, shift, relu, row(mask, r, 0, x.shape[1]), channels, inner, q0,
                     min(q0 + per, runs), out[r])


@njit(inline="always")
def _plane_affine_pass(x, scale, shift, chunk, relu, mask, stream, out):
    if _by_runs(x, stream):
        _runs_affine_pass(plane_rows(x), scale, shift, x.shape[1], x.shape[2], relu,
                          plane_rows(mask), plane_rows(out))
    else:
        for t in prange(x.shape[0] * x.shape[1] * _n_chunks(x.shape[2], chunk)):
            n, c, lo, hi, _ = _plane_task(t, x.shape, chunk)
            _affine_span(x[n, c, lo:hi], scale[c], shift[c], relu, span(mask, n, c, lo, hi),
                         stream, out[n, c, lo:hi])


@njit(inline="always")
def _row_affine_pass(x, scale, shift, channels, inner, relu, mask, out):
    if _rows_by_runs(x, inner):
        _runs_affine_pass(x, scale, shift, channels, inner, relu, mask, out)
    else:
        w = x.shape[1]
        a, b = _expand(scale, channels, inner, w), _expand(shift, channels, inner, w)
        blocks, span = _column_blocks(x, 1)
        for t in prange(x.shape[0] * blocks):  # (one loop: each costs its compile)
            if blocks == 1:  # a task a row (no views: see _row_coefficients)
                _affine_plain(x[t], a, b, relu, row(mask, t, 0, w), out[t])
            else:
                r, lo = t // blocks, t % blocks * span
                hi = min(lo + span, w)
                _affine_plain(x[r, lo:hi], a[lo:hi], b[lo:hi], relu, row(mask, r, lo, hi),
                              out[r, lo:hi])


# The forward's output: x * scale + shift, or for half outputs the float32
# form of :func:`half_coefficients` where it is exact enough.

@njit(inline="always")
def _runs_normalize_pass(x, scale, shift, coef, ok, channels, inner, relu, out):
    runs, per, k = _run_tasks(x, inner)
    for t in prange(x.shape[0] * k):
        r, q0 = t // k, t % k * per
        _normalize_runs(x[r], scale, shift, coef, ok, channels, inner, relu, q0,
                        min(q0 + per, runs), out[r])


@njit(inline="always")
def _plane_normalize_pass(x, mean, scale, shift, bias, chunk, relu, stream, out):
    coef, ok = half_coefficients(mean, scale, bias, out)
    if _by_runs(x, stream):
        _runs_normalize_pass(plane_rows(x), scale, shift, coef, ok, x.shape[1], x.shape[2],
                             relu, plane_rows(out))
    else:
        for t in prange(x.shape[0] * x.shape[1] * _n_chunks(x.shape[2], chunk)):
            n, c, lo, hi, _ = _plane_task(t, x.shape, chunk)
            _normalize_span(x[n, c, lo:hi], scale[c], shift[c], coef, c, ok, relu, stream,
                            out[n, c, lo:hi])


@njit(cache=True)
def _row_coefficients_floats(mean, scale, shift, bias, channels, inner, w, out):
    return _expand(scale, channels, inner, w), _expand(shift, channels, inner, w), None, False


@njit(cache=True)
def _row_coefficients_half(mean, scale, shift, bias, channels, inner, w, out):
    coef, ok = half_coefficients(mean, scale, bias, out)
    if not ok:
        a, b, _, _ = _row_coefficients_floats(mean, scale, shift, bias, channels, inner, w, out)
        none = np.empty(0, np.float32)
        return a, b, (none, none, none), False
    wide = _expand_rows(coef, channels, inner, w)
    return np.empty(0), np.empty(0), (wide[0], wide[1], wide[2]), True


#: ``(a, b, coef, ok)`` for :func:`_normalize_row`: ``scale`` and ``shift``
#: over the ``w`` columns of a row, or for a half ``out`` where ``ok``, the three
#: rows of :func:`half_coefficients` over them, as a tuple of float32 arrays
#: (no views are made of them in the loop over rows of up to ``ROW_TASK``
#: values: a view costs a reference count on an array every task shares;
#: longer rows' blocks of columns take views, once per ``ROW_TASK`` values).
_row_coefficients = by_element(_row_coefficients_floats, _row_coefficients_half)


@njit(inline="always")
def _row_normalize_pass(x, mean, scale, shift, bias, channels, inner, relu, out):
    if _rows_by_runs(x, inner):
        coef, ok = half_coefficients(mean, scale, bias, out)
        _runs_normalize_pass(x, scale, shift, coef, ok, channels, inner, relu, out)
    else:
        a, b, coef, ok = _row_coefficients(mean, scale, shift, bias, channels, inner,
                                           x.shape[1], out)
        blocks, span = _column_blocks(x, 1)
        for t in prange(x.shape[0] * blocks):
            if blocks == 1:
                _normalize_row(x[t], a, b, coef, ok, relu, out[t])
            else:
                r, lo = t // blocks, t % blocks * span
                _normalize_columns(x, a, b, coef, ok, relu, r, lo, min(lo + span, x.shape[1]),
                                   out)


@njit(inline="always")
def _plane_grad_sums_pass(x, dy, mask, mean, chunk):
    parts = x.shape[0] * _n_chunks(x.shape[2], chunk)
    s_dy = np.empty((parts, x.shape[1]))
    s_dyx = np.empty((parts, x.shape[1]))
    for t in prange(parts * x.shape[1]):
        n, c, lo, hi, part = _plane_task(t, x.shape, chunk)
        s_dy[part, c], s_dyx[part, c] = _grad_dot(
            x[n, c, lo:hi], dy[n, c, lo:hi], span(mask, n, c, lo, hi), mean[c])
    return _sum_parts(s_dy), _sum_parts(s_dyx)


@njit(inline="always")
def _row_grad_sums_pass(x, dy, mask, mean, parts, channels, inner, blocks):
    s_dy = np.empty((parts, channels))
    s_dyx = np.empty((parts, channels))
    m = _expand(mean, channels, inner, x.shape[1])
    for t in prange(parts * blocks):
        _row_grad_sums_task(t, x, dy, mask, m, parts, channels, inner, blocks,
                            s_dy, s_dyx)
    return _sum_parts(s_dy), _sum_parts(s_dyx)


@njit(inline="always")
def _runs_grad_input_pass(dy, x, mask, a, b, c, mean, channels, inner, out):
    runs, per, k = _run_tasks(x, inner)
    w = x.shape[1]
    for t in prange(x.shape[0] * k):
        r, q0 = t // k, t % k * per
        _grad_input_runs(dy[r], x[r], row(mask, r, 0, w), a, b, c, mean, channels, inner, q0,
                         min(q0 + per, runs), out[r])


@njit(inline="always")
def _plane_grad_input_pass(dy, x, mask, a, b, c, mean, chunk, stream, out):
    if _by_runs(x, stream):
        _runs_grad_input_pass(plane_rows(dy), plane_rows(x), plane_rows(mask), a, b, c, mean,
                              x.shape[1], x.shape[2], plane_rows(out))
    else:
        for t in prange(x.shape[0] * x.shape[1] * _n_chunks(x.shape[2], chunk)):
            n, ch, lo, hi, _ = _plane_task(t, x.shape, chunk)
            _grad_input_span(dy[n, ch, lo:hi], x[n, ch, lo:hi], span(mask, n, ch, lo, hi),
                             a[ch], b[ch], c[ch], mean[ch], stream, out[n, ch, lo:hi])


@njit(inline="always")
def _row_grad_input_pass(dy, x, mask, a, b, c, mean, channels, inner, out):
    # Half outputs keep the arrays: their runs' remainders convert one value at
    # a time (by runs took 1.2 times as long at 7 x 7 and 10 x 10 float16, 0.54
    # float32 at 10 x 10, measured).
    if _rows_by_runs(x, inner, 2 * RUN_MIN) and out.itemsize > 2:
        _runs_grad_input_pass(dy, x, mask, a, b, c, mean, channels, inner, out)
    else:
        w = x.shape[1]
        ea, eb = _expand(a, channels, inner, w), _expand(b, channels, inner, w)
        ec, em = _expand(c, channels, inner, w), _expand(mean, channels, inner, w)
        blocks, span = _column_blocks(x, 4)
        for t in prange((x.shape[0] + 3) // 4 * blocks):
            r, lo = t // blocks * 4, t % blocks * span
            _grad_input_rows(dy, x, mask, ea, eb, ec, em, r, min(r + 4, x.shape[0]), lo,
                             min(lo + span, w), out)


@njit(cache=True)
def _plane_channel_train(x, c, chunk, counts, weight, bias, eps, relu, stream, out):
    """One channel of a planes training forward, its data still in the cache
    for the second pass: ``(mean, var, invstd)``, ``out[:, c]`` written."""
    k = _n_chunks(x.shape[2], chunk)
    means, m2s = np.empty((counts.shape[0], 1)), np.empty((counts.shape[0], 1))
    for n in range(x.shape[0]):
        for q in range(k):
            lo, hi = q * chunk, min(q * chunk + chunk, x.shape[2])
            means[n * k + q, 0], m2s[n * k + q, 0] = _span_moments(x[n, c, lo:hi])
    mean, m2 = merge_moments(counts, means, m2s)
    var = m2[0] / counts.sum()
    invstd, scale, shift = _coefficient(mean[0], var, weight, bias, eps, c)
    coef, ok = half_coefficients(mean, scale, tail(bias, c), out)
    for n in range(x.shape[0]):
        for q in range(k):
            lo, hi = q * chunk, min(q * chunk + chunk, x.shape[2])
            _normalize_span(x[n, c, lo:hi], scale, shift, coef, 0, ok, relu, stream,
                            out[n, c, lo:hi])
    return mean[0], var, invstd


@njit(cache=True)
def _plane_channel_backward(dy, x, mask, mean, invstd, weight, count, training, c, chunk,
                            stream, out):
    """One channel of a planes backward, its data still in the cache for the
    second pass: ``(sum(g), sum(g * (x - mean)))``, ``out[:, c]`` written."""
    k = _n_chunks(x.shape[2], chunk)
    s_dy = s_dyx = 0.0
    for n in range(x.shape[0]):
        for q in range(k):
            lo, hi = q * chunk, min(q * chunk + chunk, x.shape[2])
            a, b = _grad_dot(x[n, c, lo:hi], dy[n, c, lo:hi], span(mask, n, c, lo, hi), mean)
            s_dy += a
            s_dyx += b
    a, b, shift = _grad_coefficient(s_dy, s_dyx, invstd, weight, count, c)
    for n in range(x.shape[0]):
        for q in range(k):
            lo, hi = q * chunk, min(q * chunk + chunk, x.shape[2])
            m = span(mask, n, c, lo, hi)
            if training:
                _grad_input_span(dy[n, c, lo:hi], x[n, c, lo:hi], m, a, b, shift, mean, stream,
                                 out[n, c, lo:hi])
            else:
                _affine_span(dy[n, c, lo:hi], a, 0.0, False, m, stream, out[n, c, lo:hi])
    return s_dy, s_dyx


# --- kernels: one pass (serial twins at the end) -----------------------------

@parallel_kernel
def plane_moments(x, chunk, counts):
    """Per-channel (mean, biased variance) of ``x`` (N, C, M); ``counts[p]``:
    elements per channel in part ``p``."""
    means, m2s = _plane_moments_pass(x, chunk)
    return _mean_var(counts, means, m2s)


@parallel_kernel
def row_moments(x, parts, channels, inner, counts, blocks):
    """Per-channel (mean, biased variance) of ``x`` (R, W), in ``blocks``
    blocks of channels per chunk of rows."""
    means, m2s = _row_moments_pass(x, parts, channels, inner, blocks)
    return _mean_var(counts, means, m2s)


@parallel_kernel
def plane_affine(x, scale, shift, chunk, relu, mask, stream, out):
    """``out = x * scale[c] + shift[c]`` for ``x`` (N, C, M); ReLU'd if
    ``relu``; 0 where ``mask > 0`` is false unless ``mask`` is None; with
    non-temporal stores if ``stream``."""
    _plane_affine_pass(x, scale, shift, chunk, relu, mask, stream, out)


@parallel_kernel
def row_affine(x, scale, shift, channels, inner, relu, mask, out):
    """:func:`plane_affine` for ``x`` (R, W), coefficients (C,)."""
    _row_affine_pass(x, scale, shift, channels, inner, relu, mask, out)


@parallel_kernel
def plane_grad_sums(x, dy, mask, mean, chunk):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean[c]))`` for (N, C, M)
    arrays, ``g`` being ``dy``, masked by ``mask > 0`` unless ``mask`` is None."""
    return _plane_grad_sums_pass(x, dy, mask, mean, chunk)


@parallel_kernel
def row_grad_sums(x, dy, mask, mean, parts, channels, inner, blocks):
    """:func:`plane_grad_sums` for ``x`` (R, W), ``mean`` (C,)."""
    return _row_grad_sums_pass(x, dy, mask, mean, parts, channels, inner, blocks)


@parallel_kernel
def plane_grad_input(dy, x, mask, a, b, c, mean, chunk, stream, out):
    """``out = g * a + (x - mean) * b + c`` per channel for (N, C, M) arrays,
    ``g`` as in :func:`plane_grad_sums`; non-temporal stores if ``stream``."""
    _plane_grad_input_pass(dy, x, mask, a, b, c, mean, chunk, stream, out)


@parallel_kernel
def row_grad_input(dy, x, mask, a, b, c, mean, channels, inner, out):
    """:func:`plane_grad_input` for (R, W) arrays, coefficients (C,)."""
    _row_grad_input_pass(dy, x, mask, a, b, c, mean, channels, inner, out)


# --- kernels: a whole forward or backward ------------------------------------

@parallel_kernel
def plane_train(x, chunk, counts, running_mean, running_var, factor, weight, bias, eps, relu,
                by_channel, stream, out):
    """Training forward of (N, C, M) ``x``: batch statistics, running update
    (unless ``running_mean`` is empty, or the statistics are not finite),
    ``out``. Returns ``(mean, invstd, updated)``. ``by_channel``: one
    task per channel, its statistics and output together (one parallel region)."""
    channels = x.shape[1]
    if by_channel:
        mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
        for c in prange(channels):
            mean[c], var[c], invstd[c] = _plane_channel_train(x, c, chunk, counts, weight, bias,
                                                              eps, relu, stream, out)
    else:
        means, m2s = _plane_moments_pass(x, chunk)
        mean, var = _mean_var(counts, means, m2s)
        invstd, scale, shift = coefficients(mean, var, weight, bias, eps)
        _plane_normalize_pass(x, mean, scale, shift, bias, chunk, relu, stream, out)
    updated = _track(running_mean, running_var, mean, var, counts.sum(), factor)
    return mean, invstd, updated


@parallel_kernel
def row_train(x, parts, channels, inner, counts, blocks, running_mean, running_var,
              factor, weight, bias, eps, relu, out):
    """:func:`plane_train` for ``x`` (R, W)."""
    means, m2s = _row_moments_pass(x, parts, channels, inner, blocks)
    mean, var = _mean_var(counts, means, m2s)
    invstd, scale, shift = coefficients(mean, var, weight, bias, eps)
    _row_normalize_pass(x, mean, scale, shift, bias, channels, inner, relu, out)
    updated = _track(running_mean, running_var, mean, var, counts.sum(), factor)
    return mean, invstd, updated


@parallel_kernel
def plane_eval(x, chunk, mean, var, weight, bias, eps, relu, stream, out):
    """Evaluation forward of (N, C, M) ``x`` with the given statistics; returns invstd."""
    invstd, scale, shift = coefficients(mean, var, weight, bias, eps)
    _plane_normalize_pass(x, mean, scale, shift, bias, chunk, relu, stream, out)
    return invstd


@parallel_kernel
def row_eval(x, channels, inner, mean, var, weight, bias, eps, relu, out):
    """:func:`plane_eval` for ``x`` (R, W)."""
    invstd, scale, shift = coefficients(mean, var, weight, bias, eps)
    _row_normalize_pass(x, mean, scale, shift, bias, channels, inner, relu, out)
    return invstd


@parallel_kernel
def plane_backward(dy, x, mask, mean, invstd, weight, training, chunk, count, by_channel,
                   stream, out):
    """Backward of a planes forward: ``out`` is the input gradient (through
    the batch statistics if ``training``), returns ``(dweight, dbias)`` in
    ``x``'s dtype; ``g`` (``dy`` masked) as in :func:`plane_grad_sums`;
    ``by_channel`` as in :func:`plane_train`."""
    channels = x.shape[1]
    if by_channel:
        s_dy, s_dyx = np.empty(channels), np.empty(channels)
        for c in prange(channels):
            s_dy[c], s_dyx[c] = _plane_channel_backward(
                dy, x, mask, mean[c], invstd[c], weight, count, training, c, chunk, stream, out)
    else:
        s_dy, s_dyx = _plane_grad_sums_pass(x, dy, mask, mean, chunk)
        a, b, c = _input_gradient(s_dy, s_dyx, invstd, weight, count, training)
        if training:
            _plane_grad_input_pass(dy, x, mask, a, b, c, mean, chunk, stream, out)
        else:
            _plane_affine_pass(dy, a, b, chunk, False, mask, stream, out)
    return _cast_gradients(s_dy, s_dyx, invstd, x)


@parallel_kernel
def row_backward(dy, x, mask, mean, invstd, weight, training, parts, channels, inner,
                 blocks, count, out):
    """:func:`plane_backward` for (R, W) arrays."""
    s_dy, s_dyx = _row_grad_sums_pass(x, dy, mask, mean, parts, channels, inner, blocks)
    a, b, c = _input_gradient(s_dy, s_dyx, invstd, weight, count, training)
    if training:
        _row_grad_input_pass(dy, x, mask, a, b, c, mean, channels, inner, out)
    else:
        _row_affine_pass(dy, a, b, channels, inner, False, mask, out)
    return _cast_gradients(s_dy, s_dyx, invstd, x)


@parallel_kernel
def bandwidth_probe(x, a, b, chunk, stream, out):
    """``out = x * a + b`` over 1-D arrays in ``chunk``s: the memory
    bandwidth probe of ``python -m nbbn bench`` (the loop of :func:`plane_affine`,
    with non-temporal stores if ``stream``, as it has for large arrays)."""
    for t in prange(_n_chunks(x.shape[0], chunk)):
        lo = t * chunk
        hi = min(lo + chunk, x.shape[0])
        _affine_span(x[lo:hi], a, b, False, None, stream, out[lo:hi])


# Serial twins: the same code without thread launches, for small inputs.
plane_moments_serial = serial_twin(plane_moments)
row_moments_serial = serial_twin(row_moments)
plane_affine_serial = serial_twin(plane_affine)
row_affine_serial = serial_twin(row_affine)
plane_grad_sums_serial = serial_twin(plane_grad_sums)
row_grad_sums_serial = serial_twin(row_grad_sums)
plane_grad_input_serial = serial_twin(plane_grad_input)
row_grad_input_serial = serial_twin(row_grad_input)
plane_train_serial = serial_twin(plane_train)
row_train_serial = serial_twin(row_train)
plane_eval_serial = serial_twin(plane_eval)
row_eval_serial = serial_twin(row_eval)
plane_backward_serial = serial_twin(plane_backward)
row_backward_serial = serial_twin(row_backward)
