"""Numba CPU kernels for batch normalization: loops and nothing else (the
inner loops, per span or block of rows, are in :mod:`nbbn.kernel_loops`).

Two memory layouts cover every input (see ``nbbn._engine.layout_of``):

* planes: ``x`` viewed as ``(N, C, M)``; one task per chunk of an ``(n, c)``
  plane, so that few channels still keep every core busy;
* rows: ``x`` viewed as ``(R, W)`` with ``W = T * C * M`` columns, channel of
  column ``j`` is ``(j // M) % C``; one task per fixed chunk of rows with
  per-column partial states, folded to per-channel states inside the task.

Tasks are fixed by the shape, never by the thread count, and partial states
are merged serially in task order, so results are bitwise reproducible for any
``numba.set_num_threads``. Every parallel kernel has a ``*_serial`` twin
(same code, ``prange`` run as ``range``; no thread launch, for small inputs):
same tasks, same order, same bits.
"""
import numpy as np
from numba import njit, prange

from ._jit import row, serial_twin, span
from .kernel_loops import (_add_columns, _add_grad_columns, _add_squared_deviations,
                           _affine_span, _axpb_columns, _expand, _fold_columns, _grad_dot,
                           _grad_input_columns, _grad_input_span, _span_moments)


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
def _row_moments_task(p, x, rows_per_chunk, channels, inner, means, m2s):
    n_rows, width = x.shape
    tiles = width // (channels * inner)
    r0 = p * rows_per_chunk
    r1 = min(r0 + rows_per_chunk, n_rows)
    col_mean = np.zeros(width)
    _add_columns(col_mean, x, r0, r1)
    col_mean *= 1.0 / (r1 - r0)
    col_m2 = np.zeros(width)
    _add_squared_deviations(col_m2, x, r0, r1, col_mean)
    # Fold the tiles * inner columns of each channel: equal counts.
    ch_mean = _fold_columns(col_mean, channels, inner, None) / (tiles * inner)
    means[p] = ch_mean
    m2s[p] = (_fold_columns(col_m2, channels, inner, None)
              + (r1 - r0) * _fold_columns(col_mean, channels, inner, ch_mean))


@njit(cache=True)
def _row_grad_sums_task(p, x, dy, mask, mean, rows_per_chunk, channels, inner, s_dy, s_dyx):
    n_rows, width = x.shape
    r0 = p * rows_per_chunk
    r1 = min(r0 + rows_per_chunk, n_rows)
    col_dy = np.zeros(width)
    col_dyx = np.zeros(width)
    _add_grad_columns(col_dy, col_dyx, x, dy, mask, r0, r1, mean)
    s_dy[p] = _fold_columns(col_dy, channels, inner, None)
    s_dyx[p] = _fold_columns(col_dyx, channels, inner, None)


# --- parallel kernels (serial twins at the end) ------------------------------

@njit(parallel=True, cache=True)
def plane_moments(x, chunk, counts):
    """Per-channel (mean, biased variance) of ``x`` (N, C, M); ``counts[p]``:
    elements per channel in part ``p``."""
    parts = x.shape[0] * _n_chunks(x.shape[2], chunk)
    means = np.empty((parts, x.shape[1]))
    m2s = np.empty((parts, x.shape[1]))
    for t in prange(parts * x.shape[1]):
        n, c, lo, hi, part = _plane_task(t, x.shape, chunk)
        means[part, c], m2s[part, c] = _span_moments(x[n, c, lo:hi])
    return _mean_var(counts, means, m2s)


@njit(parallel=True, cache=True)
def row_moments(x, rows_per_chunk, channels, inner, counts):
    """Per-channel (mean, biased variance) of ``x`` (R, W)."""
    means = np.empty((counts.shape[0], channels))
    m2s = np.empty((counts.shape[0], channels))
    for p in prange(counts.shape[0]):
        _row_moments_task(p, x, rows_per_chunk, channels, inner, means, m2s)
    return _mean_var(counts, means, m2s)


@njit(parallel=True, cache=True)
def plane_affine(x, scale, shift, chunk, relu, mask, stream, out):
    """``out = x * scale[c] + shift[c]`` for ``x`` (N, C, M); ReLU'd if
    ``relu``; 0 where ``mask > 0`` is false unless ``mask`` is None; with
    non-temporal stores if ``stream``."""
    for t in prange(x.shape[0] * x.shape[1] * _n_chunks(x.shape[2], chunk)):
        n, c, lo, hi, _ = _plane_task(t, x.shape, chunk)
        _affine_span(x[n, c, lo:hi], scale[c], shift[c], relu,
                     span(mask, n, c, lo, hi), stream, out[n, c, lo:hi])


@njit(parallel=True, cache=True)
def row_affine(x, scale, shift, channels, inner, relu, mask, out):
    """:func:`plane_affine` row by row for ``x`` (R, W), coefficients (C,)."""
    a = _expand(scale, channels, inner, x.shape[1])
    b = _expand(shift, channels, inner, x.shape[1])
    for r in prange(x.shape[0]):
        _axpb_columns(x[r], a, b, relu, row(mask, r), out[r])


@njit(parallel=True, cache=True)
def plane_grad_sums(x, dy, mask, mean, chunk):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean[c]))`` for (N, C, M)
    arrays, ``g`` being ``dy``, masked by ``mask > 0`` unless ``mask`` is None."""
    parts = x.shape[0] * _n_chunks(x.shape[2], chunk)
    s_dy = np.empty((parts, x.shape[1]))
    s_dyx = np.empty((parts, x.shape[1]))
    for t in prange(parts * x.shape[1]):
        n, c, lo, hi, part = _plane_task(t, x.shape, chunk)
        s_dy[part, c], s_dyx[part, c] = _grad_dot(
            x[n, c, lo:hi], dy[n, c, lo:hi], span(mask, n, c, lo, hi), mean[c])
    return _sum_parts(s_dy), _sum_parts(s_dyx)


@njit(parallel=True, cache=True)
def row_grad_sums(x, dy, mask, mean, rows_per_chunk, channels, inner):
    """:func:`plane_grad_sums` for ``x`` (R, W), ``mean`` (C,)."""
    parts = _n_chunks(x.shape[0], rows_per_chunk)
    s_dy = np.empty((parts, channels))
    s_dyx = np.empty((parts, channels))
    m = _expand(mean, channels, inner, x.shape[1])
    for p in prange(parts):
        _row_grad_sums_task(p, x, dy, mask, m, rows_per_chunk, channels, inner, s_dy, s_dyx)
    return _sum_parts(s_dy), _sum_parts(s_dyx)


@njit(parallel=True, cache=True)
def plane_grad_input(dy, x, mask, a, b, c, mean, chunk, stream, out):
    """``out = g * a + (x - mean) * b + c`` per channel for (N, C, M) arrays,
    ``g`` as in :func:`plane_grad_sums`; non-temporal stores if ``stream``."""
    for t in prange(x.shape[0] * x.shape[1] * _n_chunks(x.shape[2], chunk)):
        n, ch, lo, hi, _ = _plane_task(t, x.shape, chunk)
        _grad_input_span(dy[n, ch, lo:hi], x[n, ch, lo:hi],
                         span(mask, n, ch, lo, hi),
                         a[ch], b[ch], c[ch], mean[ch], stream, out[n, ch, lo:hi])


@njit(parallel=True, cache=True)
def row_grad_input(dy, x, mask, a, b, c, mean, channels, inner, out):
    """:func:`plane_grad_input` row by row for (R, W) arrays, coefficients (C,)."""
    w = x.shape[1]
    ea, eb = _expand(a, channels, inner, w), _expand(b, channels, inner, w)
    ec, em = _expand(c, channels, inner, w), _expand(mean, channels, inner, w)
    for r in prange(x.shape[0]):
        _grad_input_columns(dy[r], x[r], row(mask, r), ea, eb, ec, em, out[r])


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
def coefficients(mean, var, weight, bias, eps):
    """``(invstd, scale, shift)`` of ``y = x * scale + shift`` per channel;
    ``weight``, ``bias`` may be None."""
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd.copy() if weight is None else weight * invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    return invstd, scale, shift


@njit(cache=True)
def backward_coefficients(s_dy, s_dyx, invstd, weight, count):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` per channel, for
    batch statistics over ``count`` values; ``weight`` may be None."""
    a = invstd.copy() if weight is None else weight * invstd
    return a, -a * invstd * (s_dyx * invstd) / count, -a * s_dy / count


@njit(parallel=True, cache=True)
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
