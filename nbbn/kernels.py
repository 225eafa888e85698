"""Numba CPU kernels for batch normalization: loops and nothing else.

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
same tasks, same order, same bits. Statistics take one pass over
memory: each block of ``BLOCK`` elements is summed, then its squared
deviations are summed while it is still in L1, and block states (count, mean,
M2) are merged with Chan's formula. All accumulation is in float64.

Every inner loop runs over a 1-D span from index 0: with a start offset Numba
must handle negative (wrap-around) indices and LLVM no longer vectorizes.

``relu`` variants compute ``max(v, 0)`` in the same pass (NaN propagates);
``mask`` variants read a saved ReLU output ``y`` and treat the gradient as 0
where ``y > 0`` is false, as the ReLU backward does.
"""
import numpy as np
from numba import njit, prange

from ._jit import (STREAM_BYTES, row, serial_twin, span, store_fence, stream_axpb,
                   stream_grad_input)

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
        acc += x[i]
    return acc


@njit(fastmath=_REDUCE, cache=True)
def _sum_squared_deviations(x, mean):
    acc = 0.0
    for i in range(x.shape[0]):
        d = x[i] - mean
        acc += d * d
    return acc


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
        size = block.shape[0]
        block_mean = _sum(block) / size
        block_m2 = _sum_squared_deviations(block, block_mean)
        count, mean, m2 = _chan(count, mean, m2, size, block_mean, block_m2)
    return mean, m2


@njit(fastmath=_REDUCE, cache=True)
def _grad_dot(x, dy, mask, mean):
    """sum(g) and sum(g * (x - mean)), g = dy masked by ``mask > 0`` (or not)."""
    s_dy = 0.0
    s_dyx = 0.0
    if mask is None:
        for i in range(x.shape[0]):
            g = dy[i] + 0.0
            s_dy += g
            s_dyx += g * (x[i] - mean)
    else:
        for i in range(x.shape[0]):
            g = dy[i] + 0.0 if mask[i] > 0 else 0.0
            s_dy += g
            s_dyx += g * (x[i] - mean)
    return s_dy, s_dyx


# No fastmath below: a fused multiply-add would turn x*a - mean*a into a
# rounding residual instead of the exact zero of a constant channel.

@njit(cache=True)
def _axpb(x, a, b, out):
    for i in range(x.shape[0]):
        out[i] = x[i] * a + b


@njit(cache=True)
def _axpb_relu(x, a, b, relu, out):
    if relu:
        for i in range(x.shape[0]):
            v = x[i] * a + b
            out[i] = 0.0 if v < 0.0 else v
    else:
        _axpb(x, a, b, out)


@njit(cache=True)
def _stream_parts(out):
    """(head, body): ``out[head:body]`` starts 64-byte aligned and holds whole
    vectors of ``STREAM_BYTES``; the rest is written with plain stores."""
    n = out.shape[0]
    head = min((-out.ctypes.data) % STREAM_BYTES // out.itemsize, n)
    w = STREAM_BYTES // out.itemsize
    return head, head + (n - head) // w * w


@njit(cache=True)
def _affine_span(x, a, b, relu, mask, stream, out):
    if mask is not None:
        for i in range(x.shape[0]):
            out[i] = x[i] * a + b if mask[i] > 0 else 0.0
    elif stream:
        head, body = _stream_parts(out)
        _axpb_relu(x[:head], a, b, relu, out[:head])
        for i in range(head, body, STREAM_BYTES // out.itemsize):
            stream_axpb(x, i, a, b, relu, out)
        _axpb_relu(x[body:], a, b, relu, out[body:])
        store_fence()
    else:
        _axpb_relu(x, a, b, relu, out)


@njit(cache=True)
def _axpb_columns(x, a, b, relu, mask, out):
    if mask is not None:
        for j in range(x.shape[0]):
            out[j] = x[j] * a[j] + b[j] if mask[j] > 0 else 0.0
    elif relu:
        for j in range(x.shape[0]):
            v = x[j] * a[j] + b[j]
            out[j] = 0.0 if v < 0.0 else v
    else:
        for j in range(x.shape[0]):
            out[j] = x[j] * a[j] + b[j]


@njit(cache=True)
def _grad_input_plain(dy, x, mask, a, b, c, mean, out):
    if mask is None:
        for i in range(x.shape[0]):
            out[i] = dy[i] * a + (x[i] - mean) * b + c
    else:
        for i in range(x.shape[0]):
            g = dy[i] + 0.0 if mask[i] > 0 else 0.0
            out[i] = g * a + (x[i] - mean) * b + c


@njit(cache=True)
def _grad_input_span(dy, x, mask, a, b, c, mean, stream, out):
    if not stream:
        _grad_input_plain(dy, x, mask, a, b, c, mean, out)
        return
    head, body = _stream_parts(out)
    step = STREAM_BYTES // out.itemsize
    if mask is None:
        _grad_input_plain(dy[:head], x[:head], None, a, b, c, mean, out[:head])
        for i in range(head, body, step):
            stream_grad_input(dy, x, None, i, a, b, c, mean, out)
        _grad_input_plain(dy[body:], x[body:], None, a, b, c, mean, out[body:])
    else:
        _grad_input_plain(dy[:head], x[:head], mask[:head], a, b, c, mean, out[:head])
        for i in range(head, body, step):
            stream_grad_input(dy, x, mask, i, a, b, c, mean, out)
        _grad_input_plain(dy[body:], x[body:], mask[body:], a, b, c, mean, out[body:])
    store_fence()


@njit(cache=True)
def _grad_input_columns(dy, x, mask, a, b, c, mean, out):
    if mask is None:
        for j in range(x.shape[0]):
            out[j] = dy[j] * a[j] + (x[j] - mean[j]) * b[j] + c[j]
    else:
        for j in range(x.shape[0]):
            g = dy[j] + 0.0 if mask[j] > 0 else 0.0
            out[j] = g * a[j] + (x[j] - mean[j]) * b[j] + c[j]


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
def _add_grad_columns(s_dy, s_dyx, x, dy, mask, mean):
    if mask is None:
        for j in range(s_dy.shape[0]):
            g = dy[j] + 0.0
            s_dy[j] += g
            s_dyx[j] += g * (x[j] - mean[j])
    else:
        for j in range(s_dy.shape[0]):
            g = dy[j] + 0.0 if mask[j] > 0 else 0.0
            s_dy[j] += g
            s_dyx[j] += g * (x[j] - mean[j])


@njit(cache=True)
def _fold_columns(col, channels, inner, center):
    """Per channel, the sum over its ``tiles * inner`` columns of ``col``, or
    of ``(col - center[c])**2`` unless ``center`` is None; tiles in order."""
    out = np.zeros(channels)
    tiles = col.shape[0] // (channels * inner)
    if inner == 1:  # one column per channel and tile: what the span loops give
        for t in range(tiles):
            tile = col[t * channels:(t + 1) * channels]
            if center is None:
                for c in range(channels):
                    out[c] += tile[c]
            else:
                for c in range(channels):
                    out[c] += (tile[c] - center[c]) * (tile[c] - center[c])
        return out
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
    out = np.empty(width)
    j = 0
    for _ in range(width // (channels * inner)):
        for c in range(channels):
            for i in range(inner):
                out[j + i] = values[c]
            j += inner
    return out


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
    for r in range(r0, r1):
        _add_columns(col_mean, x[r])
    col_mean *= 1.0 / (r1 - r0)
    col_m2 = np.zeros(width)
    for r in range(r0, r1):
        _add_squared_deviations(col_m2, x[r], col_mean)
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
    for r in range(r0, r1):
        _add_grad_columns(col_dy, col_dyx, x[r], dy[r], row(mask, r), mean)
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
