"""Numba CPU kernels for batch normalization: loops and nothing else.

Two memory layouts cover every input (see ``nbbn._layout``):

* planes: ``x`` viewed as ``(N, C, M)``; one task per chunk of an ``(n, c)``
  plane, so that few channels still keep every core busy;
* rows: ``x`` viewed as ``(R, W)`` with ``W = T * C * M`` columns, channel of
  column ``j`` is ``(j // M) % C``; one task per fixed chunk of rows with
  per-column partial states, folded to per-channel states inside the task.

Tasks are fixed by the shape, never by the thread count, and partial states
are merged serially in task order, so results are bitwise reproducible for any
``numba.set_num_threads``. Statistics take one pass over memory: each block of
``BLOCK`` elements is summed, then its squared deviations are summed while it
is still in L1, and block states (count, mean, M2) are merged with Chan's
formula. All accumulation is in float64.
"""
import numpy as np
from numba import njit, prange

#: Elements whose second moment is taken while they sit in L1.
BLOCK = 2048
# Reductions may be reordered (so LLVM vectorizes them); NaN and Inf must
# still propagate, so no 'nnan' or 'ninf'.
_REDUCE = {"reassoc", "nsz", "contract"}


@njit(fastmath=_REDUCE, cache=True)
def _sum(x, start, stop):
    acc = 0.0
    for i in range(start, stop):
        acc += x[i]
    return acc


@njit(fastmath=_REDUCE, cache=True)
def _sum_squared_deviations(x, start, stop, mean):
    acc = 0.0
    for i in range(start, stop):
        d = x[i] - mean
        acc += d * d
    return acc


@njit(fastmath=_REDUCE, cache=True)
def _grad_dot(x, dy, start, stop, mean):
    s_dy = 0.0
    s_dyx = 0.0
    for i in range(start, stop):
        g = dy[i] + 0.0
        s_dy += g
        s_dyx += g * (x[i] - mean)
    return s_dy, s_dyx


@njit(cache=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) states (Chan et al.)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    w = n_b / n
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@njit(cache=True)
def _axpb(x, a, b, out):
    # No fastmath: a fused multiply-add would turn x*a - mean*a into a
    # rounding residual instead of the exact zero of a constant channel.
    for i in range(x.shape[0]):
        out[i] = x[i] * a + b


@njit(cache=True)
def _axpb_columns(x, a, b, out):
    for j in range(x.shape[0]):
        out[j] = x[j] * a[j] + b[j]


@njit(cache=True)
def _grad_input_span(dy, x, a, b, c, mean, out):
    for i in range(x.shape[0]):
        out[i] = dy[i] * a + (x[i] - mean) * b + c


@njit(cache=True)
def _grad_input_columns(dy, x, a, b, c, mean, out):
    for j in range(x.shape[0]):
        out[j] = dy[j] * a[j] + (x[j] - mean[j]) * b[j] + c[j]


@njit(cache=True)
def _add_columns(acc, row):
    for j in range(acc.shape[0]):
        acc[j] += row[j]


@njit(cache=True)
def _add_squared_deviations(acc, row, mean):
    for j in range(acc.shape[0]):
        d = row[j] - mean[j]
        acc[j] += d * d


@njit(cache=True)
def _add_grad_columns(s_dy, s_dyx, x, dy, mean):
    for j in range(s_dy.shape[0]):
        g = dy[j] + 0.0
        s_dy[j] += g
        s_dyx[j] += g * (x[j] - mean[j])


@njit(parallel=True, cache=True)
def plane_moments(x, chunk, means, m2s):
    """Per-chunk (mean, M2) of ``x`` (N, C, M) into ``means[n*K + k, c]``."""
    n_planes, channels, m = x.shape
    k_chunks = (m + chunk - 1) // chunk
    for t in prange(n_planes * channels * k_chunks):
        n = t // (channels * k_chunks)
        c = (t // k_chunks) % channels
        k = t % k_chunks
        plane = x[n, c]
        stop = min((k + 1) * chunk, m)
        count, mean, m2 = 0.0, 0.0, 0.0
        for start in range(k * chunk, stop, BLOCK):
            end = min(start + BLOCK, stop)
            block_mean = _sum(plane, start, end) / (end - start)
            block_m2 = _sum_squared_deviations(plane, start, end, block_mean)
            count, mean, m2 = _chan(count, mean, m2, end - start, block_mean, block_m2)
        means[n * k_chunks + k, c] = mean
        m2s[n * k_chunks + k, c] = m2


@njit(parallel=True, cache=True)
def row_moments(x, rows_per_chunk, channels, inner, means, m2s):
    """Per-chunk (mean, M2) of ``x`` (R, W) into ``means[p, c]``."""
    n_rows, width = x.shape
    tiles = width // (channels * inner)
    for p in prange(means.shape[0]):
        r0 = p * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, n_rows)
        col_mean = np.zeros(width)
        for r in range(r0, r1):
            _add_columns(col_mean, x[r])
        col_mean *= 1.0 / (r1 - r0)
        col_m2 = np.zeros(width)
        for r in range(r0, r1):
            _add_squared_deviations(col_m2, x[r], col_mean)
        # Fold the tiles * inner columns of each channel: equal counts.
        for c in range(channels):
            s = 0.0
            for t in range(tiles):
                base = (t * channels + c) * inner
                s += _sum(col_mean, base, base + inner)
            ch_mean = s / (tiles * inner)
            q = 0.0
            for t in range(tiles):
                base = (t * channels + c) * inner
                q += _sum(col_m2, base, base + inner)
                q += (r1 - r0) * _sum_squared_deviations(col_mean, base, base + inner, ch_mean)
            means[p, c] = ch_mean
            m2s[p, c] = q


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


@njit(parallel=True, cache=True)
def plane_affine(x, scale, shift, chunk, out):
    """``out = x * scale[c] + shift[c]`` for ``x`` (N, C, M)."""
    n_planes, channels, m = x.shape
    k_chunks = (m + chunk - 1) // chunk
    for t in prange(n_planes * channels * k_chunks):
        n = t // (channels * k_chunks)
        c = (t // k_chunks) % channels
        k = t % k_chunks
        stop = min((k + 1) * chunk, m)
        _axpb(x[n, c, k * chunk:stop], scale[c], shift[c], out[n, c, k * chunk:stop])


@njit(parallel=True, cache=True)
def row_affine(x, scale, shift, out):
    """``out = x * scale + shift`` row by row for ``x`` (R, W), coefficients (W,)."""
    for r in prange(x.shape[0]):
        _axpb_columns(x[r], scale, shift, out[r])


@njit(parallel=True, cache=True)
def plane_grad_sums(x, dy, mean, chunk, s_dy, s_dyx):
    """Per-chunk sums of ``dy`` and ``dy * (x - mean[c])`` into ``[n*K + k, c]``."""
    n_planes, channels, m = x.shape
    k_chunks = (m + chunk - 1) // chunk
    for t in prange(n_planes * channels * k_chunks):
        n = t // (channels * k_chunks)
        c = (t // k_chunks) % channels
        k = t % k_chunks
        stop = min((k + 1) * chunk, m)
        a, b = _grad_dot(x[n, c], dy[n, c], k * chunk, stop, mean[c])
        s_dy[n * k_chunks + k, c] = a
        s_dyx[n * k_chunks + k, c] = b


@njit(parallel=True, cache=True)
def row_grad_sums(x, dy, mean, rows_per_chunk, channels, inner, s_dy, s_dyx):
    """Per-chunk sums of ``dy`` and ``dy * (x - mean)`` for ``x`` (R, W), mean (W,)."""
    n_rows, width = x.shape
    tiles = width // (channels * inner)
    for p in prange(s_dy.shape[0]):
        r0 = p * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, n_rows)
        col_dy = np.zeros(width)
        col_dyx = np.zeros(width)
        for r in range(r0, r1):
            _add_grad_columns(col_dy, col_dyx, x[r], dy[r], mean)
        for c in range(channels):
            a = 0.0
            b = 0.0
            for t in range(tiles):
                base = (t * channels + c) * inner
                a += _sum(col_dy, base, base + inner)
                b += _sum(col_dyx, base, base + inner)
            s_dy[p, c] = a
            s_dyx[p, c] = b


@njit(parallel=True, cache=True)
def plane_grad_input(dy, x, a, b, c, mean, chunk, out):
    """``out = dy * a + (x - mean) * b + c`` per channel for (N, C, M) arrays."""
    n_planes, channels, m = x.shape
    k_chunks = (m + chunk - 1) // chunk
    for t in prange(n_planes * channels * k_chunks):
        n = t // (channels * k_chunks)
        ch = (t // k_chunks) % channels
        k = t % k_chunks
        lo = k * chunk
        hi = min(lo + chunk, m)
        _grad_input_span(dy[n, ch, lo:hi], x[n, ch, lo:hi], a[ch], b[ch], c[ch],
                         mean[ch], out[n, ch, lo:hi])


@njit(parallel=True, cache=True)
def row_grad_input(dy, x, a, b, c, mean, out):
    """``out = dy * a + (x - mean) * b + c`` row by row, coefficients (W,)."""
    for r in prange(x.shape[0]):
        _grad_input_columns(dy[r], x[r], a, b, c, mean, out[r])


@njit(cache=True)
def update_running(running_mean, running_var, mean, unbiased_var, factor):
    """Exponential moving average of the statistics, in place."""
    for c in range(running_mean.shape[0]):
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * unbiased_var[c]
