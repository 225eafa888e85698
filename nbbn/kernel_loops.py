"""The inner loops of :mod:`nbbn.kernels`: what one task does to one span
(a 1-D piece of a plane) or one block of rows (rows layout). Loops and
nothing else.

Every span loop runs from index 0 over a 1-D view: with a start offset numba
must handle negative (wrap-around) indices and LLVM no longer vectorizes.
Statistics take one pass over memory: each block of ``BLOCK`` elements is
summed, then its squared deviations are summed while it is still in L1, and
block states (count, mean, M2) are merged with Chan's formula; all
accumulation is in float64. ``relu`` variants compute ``max(v, 0)`` in the
same pass (NaN propagates); ``mask`` variants read a saved ReLU output and
treat the gradient as 0 where ``mask > 0`` is false, as the ReLU backward does.
"""
import numpy as np
from numba import njit

from ._jit import STREAM_BYTES, store_fence, stream_axpb, stream_grad_input

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


# Column sums over rows r0..r1 of (R, W) arrays into float64 accumulators,
# four rows per visit of the accumulator (a quarter of its loads and stores).

@njit(cache=True)
def _add_columns(acc, x, r0, r1):
    r = r0
    while r + 4 <= r1:
        a, b, c, d = x[r], x[r + 1], x[r + 2], x[r + 3]
        for j in range(acc.shape[0]):
            acc[j] += (a[j] + 0.0 + b[j]) + (c[j] + 0.0 + d[j])
        r += 4
    for k in range(r, r1):
        a = x[k]
        for j in range(acc.shape[0]):
            acc[j] += a[j]


@njit(cache=True)
def _add_squared_deviations(acc, x, r0, r1, mean):
    r = r0
    while r + 4 <= r1:
        a, b, c, d = x[r], x[r + 1], x[r + 2], x[r + 3]
        for j in range(acc.shape[0]):
            da, db, dc, dd = a[j] - mean[j], b[j] - mean[j], c[j] - mean[j], d[j] - mean[j]
            acc[j] += (da * da + db * db) + (dc * dc + dd * dd)
        r += 4
    for k in range(r, r1):
        a = x[k]
        for j in range(acc.shape[0]):
            da = a[j] - mean[j]
            acc[j] += da * da


@njit(cache=True)
def _gradient(dy, mask, r, j):
    """``dy[r, j]`` as float64, 0 where ``mask[r, j] > 0`` is false (if a mask)."""
    if mask is None:
        return dy[r, j] + 0.0
    return dy[r, j] + 0.0 if mask[r, j] > 0 else 0.0


@njit(cache=True)
def _add_grad_columns(s_dy, s_dyx, x, dy, mask, r0, r1, mean):
    r = r0
    while r + 4 <= r1:
        for j in range(s_dy.shape[0]):
            ga, gb = _gradient(dy, mask, r, j), _gradient(dy, mask, r + 1, j)
            gc, gd = _gradient(dy, mask, r + 2, j), _gradient(dy, mask, r + 3, j)
            m = mean[j]
            s_dy[j] += (ga + gb) + (gc + gd)
            s_dyx[j] += ((ga * (x[r, j] - m) + gb * (x[r + 1, j] - m))
                         + (gc * (x[r + 2, j] - m) + gd * (x[r + 3, j] - m)))
        r += 4
    for k in range(r, r1):
        for j in range(s_dy.shape[0]):
            g = _gradient(dy, mask, k, j)
            s_dy[j] += g
            s_dyx[j] += g * (x[k, j] - mean[j])


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
