"""Drive the CPU kernels: choose a layout for a shape, allocate partial
states, merge them, and guard against a threading layer that is not
thread-safe. Arrays reaching this module are already validated."""
import math
import threading
from typing import NamedTuple

import numba
import numpy as np

from . import kernels

#: Elements of one plane task (planes layout).
PLANE_CHUNK = 1 << 15
#: Elements of one row-chunk task (rows layout), at least ``MIN_ROWS`` rows.
ROW_CHUNK = 1 << 15
MIN_ROWS = 16
#: Planes shorter than this are read row by row instead.
MIN_PLANE = 64
#: Narrow rows are tiled up to this many columns so inner loops stay long.
TILE_WIDTH = 1024


class Layout(NamedTuple):
    """How an array is viewed by the kernels.

    ``view`` is ``(N, C, M)`` for planes, ``(R, W)`` for rows, where each
    row holds ``W // (C * inner)`` tiles of ``C`` channels of ``inner``
    consecutive elements.
    """

    view: tuple
    planes: bool
    channels: int
    inner: int
    count: int  # elements per channel

    @property
    def rows_per_chunk(self):
        return max(MIN_ROWS, ROW_CHUNK // self.view[1])


def layout_of(shape, axis):
    """The kernel layout of an array of ``shape`` with channels on ``axis``."""
    channels = shape[axis]
    count = math.prod(shape) // channels
    if axis == 1 and len(shape) > 2:
        inner = math.prod(shape[2:])
        if inner >= MIN_PLANE:
            return Layout((shape[0], channels, inner), True, channels, inner, count)
        rows, width = shape[0], channels * inner
    else:
        inner, rows, width = 1, count, channels
    # Largest power of two dividing ``rows`` that keeps the tile narrow.
    tile = min(rows & -rows, 1 << max(0, (TILE_WIDTH // width).bit_length() - 1))
    return Layout((rows // tile, width * tile), False, channels, inner, count)


_lock = threading.Lock()
_lock_needed = None  # unknown until the first parallel kernel has run


def _run(kernel, *args):
    """Call a parallel kernel; serialize calls under numba's workqueue layer,
    which aborts the process when entered from two threads at once."""
    global _lock_needed
    if _lock_needed is False:
        return kernel(*args)
    with _lock:
        result = kernel(*args)
        _lock_needed = numba.threading_layer() == "workqueue"
    return result


def _columns(values, layout):
    """Per-channel values repeated for every column of a rows view."""
    tiles = layout.view[1] // (layout.channels * layout.inner)
    return np.tile(np.repeat(values, layout.inner), tiles)


def _chunk_counts(layout):
    """Elements per channel in each partial state, in merge order."""
    if layout.planes:
        n, _, m = layout.view
        sizes = np.full(-(-m // PLANE_CHUNK), PLANE_CHUNK, dtype=np.float64)
        sizes[-1] = m - PLANE_CHUNK * (sizes.size - 1)
        return np.tile(sizes, n)
    rows, rpc = layout.view[0], layout.rows_per_chunk
    per_row = layout.view[1] // layout.channels
    sizes = np.full(-(-rows // rpc), rpc * per_row, dtype=np.float64)
    sizes[-1] = (rows - rpc * (sizes.size - 1)) * per_row
    return sizes


def _partials(layout, counts):
    shape = (counts.size, layout.channels)
    return np.empty(shape), np.empty(shape)


def moments(x, layout):
    """Per-channel mean and biased variance (float64) in one pass over ``x``."""
    v = x.reshape(layout.view)
    counts = _chunk_counts(layout)
    means, m2s = _partials(layout, counts)
    if layout.planes:
        _run(kernels.plane_moments, v, PLANE_CHUNK, means, m2s)
    else:
        _run(kernels.row_moments, v, layout.rows_per_chunk, layout.channels,
             layout.inner, means, m2s)
    mean, m2 = kernels.merge_moments(counts, means, m2s)
    return mean, m2 / layout.count


def affine(x, layout, scale, shift, out):
    """``out = x * scale + shift`` per channel; coefficients float64 (C,)."""
    v, o = x.reshape(layout.view), out.reshape(layout.view)
    if layout.planes:
        _run(kernels.plane_affine, v, scale, shift, PLANE_CHUNK, o)
    else:
        _run(kernels.row_affine, v, _columns(scale, layout), _columns(shift, layout), o)
    return out


def grad_sums(x, dy, layout, mean):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass."""
    v, g = x.reshape(layout.view), dy.reshape(layout.view)
    s_dy, s_dyx = _partials(layout, _chunk_counts(layout))
    if layout.planes:
        _run(kernels.plane_grad_sums, v, g, mean, PLANE_CHUNK, s_dy, s_dyx)
    else:
        _run(kernels.row_grad_sums, v, g, _columns(mean, layout), layout.rows_per_chunk,
             layout.channels, layout.inner, s_dy, s_dyx)
    return s_dy.sum(axis=0), s_dyx.sum(axis=0)


def grad_input(dy, x, layout, a, b, c, mean, out):
    """``out = dy * a + (x - mean) * b + c`` per channel."""
    g, v, o = dy.reshape(layout.view), x.reshape(layout.view), out.reshape(layout.view)
    if layout.planes:
        _run(kernels.plane_grad_input, g, v, a, b, c, mean, PLANE_CHUNK, o)
    else:
        cols = (_columns(z, layout) for z in (a, b, c, mean))
        _run(kernels.row_grad_input, g, v, *cols, o)
    return out
