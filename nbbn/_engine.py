"""Drive the CPU kernels: choose a layout for a shape, allocate partial
states, merge them, and pick the parallel kernel or its serial twin (the
threading layer's part is in :mod:`nbbn._threads`). Arrays reaching this
module are already validated.

Numba is imported on the first kernel call, not with this module: ``import
nbbn`` stays fast, and a process that only builds layers never pays for it.
"""
import functools
import math
import os
from typing import NamedTuple

import numpy as np

from . import _threads

#: Elements of one plane task (planes layout).
PLANE_CHUNK = 1 << 15
#: Elements of one row-chunk task (rows layout), at least ``MIN_ROWS`` rows.
ROW_CHUNK = 1 << 17
MIN_ROWS = 16
#: Planes shorter than this are read row by row instead.
MIN_PLANE = 64
#: Narrow rows are tiled up to this many columns so inner loops stay long.
TILE_WIDTH = 1024
#: Inputs of at most this many elements run the serial twins of the kernels
#: (the same tasks in the same order, so the same bits): starting threads
#: costs more than it saves there, and far more on a busy machine.
SERIAL_MAX = 1 << 15


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes():
    """Size of the largest CPU cache (Linux sysfs), or 32 MiB when unknown."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(root) if os.path.isdir(root) else ():
        try:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


#: Planes outputs larger than this (bytes) are written with non-temporal
#: stores: they would not stay in the caches anyway, and streaming them skips
#: reading every line before writing it. None: the last-level cache's size.
#: Smaller outputs are faster through the cache, and so are rows of any size
#: (measured: 7-12% slower streamed, with per-column coefficients).
STREAM_MIN_BYTES = None
#: Planes layout, training and backward: inputs up to this size (and with two
#: channels a thread) give each task a whole channel, statistics and output in
#: one parallel region (measured here: 10-28% faster up to 4 MiB; slower
#: beyond, where planes read channel by channel defeat the prefetchers).
BY_CHANNEL_MAX_BYTES = 4 << 20
#: Rows layout: fewer chunks of rows than threads are split into blocks of
#: channels, each at least this many columns wide (shorter rows of blocks
#: cost more than the threads gain).
MIN_BLOCK_WIDTH = 256

_kernels = None


def kernels():
    """The :mod:`nbbn.kernels` module, imported (with numba) on first use."""
    global _kernels
    if _kernels is None:
        try:
            from . import kernels as module
        except RuntimeError as e:  # read-only site-packages and no user cache folder
            if "no locator available" not in str(e):
                raise
            from ._jit import use_temporary_cache_dir
            use_temporary_cache_dir()
            from . import kernels as module
        _kernels = module
    return _kernels


class Layout(NamedTuple):
    """How an array is viewed and cut into tasks by the kernels.

    ``view`` is ``(N, C, M)`` for planes, ``(R, W)`` for rows, where each
    row holds ``W // (C * inner)`` tiles of ``C`` channels of ``inner``
    consecutive elements. ``counts`` are the elements per channel of each
    partial state, in merge order (read-only).
    """

    view: tuple
    planes: bool
    channels: int
    inner: int
    count: int  # elements per channel
    counts: np.ndarray
    rows_per_chunk: int  # rows layout
    blocks: int  # blocks of channels per chunk of rows (rows layout)
    serial: bool  # the kernels run in the calling thread only
    stream: bool  # outputs are written with non-temporal stores (planes)
    by_channel: bool  # planes: one task per channel in training and backward


@functools.lru_cache(maxsize=512)
def layout_of(shape, axis, itemsize=4):
    """The kernel layout of an array of ``shape`` with channels on ``axis``
    and ``itemsize`` bytes per element."""
    channels = shape[axis]
    count = math.prod(shape) // channels
    nbytes = count * channels * itemsize
    serial = count * channels <= SERIAL_MAX
    stream = nbytes > (STREAM_MIN_BYTES if STREAM_MIN_BYTES is not None
                       else last_level_cache_bytes())
    if axis == 1 and len(shape) > 2 and math.prod(shape[2:]) >= MIN_PLANE:
        view = (shape[0], channels, math.prod(shape[2:]))
        sizes = np.full(-(-view[2] // PLANE_CHUNK), PLANE_CHUNK, dtype=np.float64)
        sizes[-1] = view[2] - PLANE_CHUNK * (sizes.size - 1)
        by_channel = (not serial and channels >= 2 * _max_threads()
                      and nbytes <= BY_CHANNEL_MAX_BYTES)
        return Layout(view, True, channels, view[2], count, _frozen(np.tile(sizes, view[0])),
                      0, 1, serial, stream, by_channel)
    if axis == 1 and len(shape) > 2:
        inner = math.prod(shape[2:])
        rows, width = shape[0], channels * inner
    else:
        inner, rows, width = 1, count, channels
    # Largest power of two dividing ``rows`` that keeps the tile narrow.
    tile = min(rows & -rows, 1 << max(0, (TILE_WIDTH // width).bit_length() - 1))
    view = (rows // tile, width * tile)
    rows_per_chunk = max(MIN_ROWS, ROW_CHUNK // view[1])
    parts = -(-view[0] // rows_per_chunk)
    sizes = np.full(parts, rows_per_chunk * (view[1] // channels), dtype=np.float64)
    sizes[-1] = (view[0] - rows_per_chunk * (parts - 1)) * (view[1] // channels)
    # Too few chunks of rows for the threads: split each into blocks of
    # channels (independent columns: the same bits).
    threads = 1 if serial else _max_threads()
    blocks = max(1, min(-(-threads // parts), channels * inner // MIN_BLOCK_WIDTH, channels))
    return Layout(view, False, channels, inner, count, _frozen(sizes), rows_per_chunk, blocks,
                  serial, False, False)


def _max_threads():
    from numba import config
    return config.NUMBA_NUM_THREADS


def _frozen(a):
    a.flags.writeable = False
    return a


def _run(layout, name, *args):
    """Call kernel ``name``, or its serial twin for a small ``layout`` (and in
    a child forked from GNU OpenMP threads); see :mod:`nbbn._threads`."""
    k = kernels()
    if layout.serial or not _threads.parallel_ok:
        return getattr(k, name + "_serial")(*args)
    kernel = getattr(k, name)
    lock = _threads.lock
    if lock is None:
        return kernel(*args)
    with lock:
        result = kernel(*args)
        if _threads.layer() is None:
            _threads.started()
    return result


def _stream(layout, out):
    return layout.stream and out.flags.aligned


def merge_moments(counts, means, m2s):
    """Merge partial ``(count, mean, M2)`` states in order (Chan): (mean, M2)."""
    return kernels().merge_moments(counts, means, m2s)


def update_running(running_mean, running_var, mean, unbiased_var, factor):
    """``running = (1 - factor) * running + factor * batch``, in place, unless
    the batch statistics are not finite; return whether it updated."""
    return kernels().update_running(running_mean, running_var, mean, unbiased_var, factor)


def coefficients(mean, var, weight, bias, eps):
    """``(invstd, scale, shift)`` float64 (C,): ``y = x * scale + shift`` is
    ``(x - mean) / sqrt(var + eps) * weight + bias`` (weight, bias: None or float)."""
    return kernels().coefficients(mean, var, weight, bias, eps)


def backward_coefficients(s_dy, s_dyx, invstd, weight, count):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` (float64 (C,)) from
    ``s_dy = sum(dy)``, ``s_dyx = sum(dy * (x - mean))`` over ``count`` values."""
    return kernels().backward_coefficients(s_dy, s_dyx, invstd, weight, float(count))


# --- one pass over the data ---------------------------------------------------

def moments(x, layout):
    """Per-channel mean and biased variance (float64) in one pass over ``x``."""
    v = x.reshape(layout.view)
    if layout.planes:
        return _run(layout, "plane_moments", v, PLANE_CHUNK, layout.counts)
    return _run(layout, "row_moments", v, layout.rows_per_chunk, layout.channels,
                layout.inner, layout.counts, layout.blocks)


def _view(a, layout):
    return None if a is None else a.reshape(layout.view)


def affine(x, layout, scale, shift, out, *, relu=False, mask=None):
    """``out = x * scale + shift`` per channel; coefficients float64 (C,).

    ``relu``: ``out = max(x * scale + shift, 0)`` in the same pass.
    ``mask`` (an array like ``x``): ``out`` is 0 where ``mask > 0`` is false.
    """
    v, o, m = x.reshape(layout.view), out.reshape(layout.view), _view(mask, layout)
    if layout.planes:
        _run(layout, "plane_affine", v, scale, shift, PLANE_CHUNK, bool(relu), m,
             _stream(layout, out), o)
    else:
        _run(layout, "row_affine", v, scale, shift, layout.channels, layout.inner,
             bool(relu), m, o)
    return out


def grad_sums(x, dy, layout, mean, *, mask=None):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` in one pass, where
    ``g`` is ``dy``, or ``dy`` where ``mask > 0`` and 0 elsewhere."""
    v, g, m = x.reshape(layout.view), dy.reshape(layout.view), _view(mask, layout)
    if layout.planes:
        return _run(layout, "plane_grad_sums", v, g, m, mean, PLANE_CHUNK)
    return _run(layout, "row_grad_sums", v, g, m, mean, layout.rows_per_chunk,
                layout.channels, layout.inner, layout.blocks)


def grad_input(dy, x, layout, a, b, c, mean, out, *, mask=None):
    """``out = g * a + (x - mean) * b + c`` per channel, ``g`` as in :func:`grad_sums`."""
    g, v, o = dy.reshape(layout.view), x.reshape(layout.view), out.reshape(layout.view)
    m = _view(mask, layout)
    if layout.planes:
        _run(layout, "plane_grad_input", g, v, m, a, b, c, mean, PLANE_CHUNK,
             _stream(layout, out), o)
    else:
        _run(layout, "row_grad_input", g, v, m, a, b, c, mean, layout.channels, layout.inner, o)
    return out


# --- a whole forward or backward in one call -------------------------------------

def train(x, layout, running_mean, running_var, factor, weight, bias, eps, relu, out):
    """Training forward into ``out``: ``(mean, var, invstd, updated)``, float64
    batch statistics; the running statistics (None, or updated in place unless
    the batch's are not finite) move by ``factor``."""
    v, o = x.reshape(layout.view), out.reshape(layout.view)
    if layout.planes:
        return _run(layout, "plane_train", v, PLANE_CHUNK, layout.counts, running_mean,
                    running_var, factor, weight, bias, eps, relu, layout.by_channel,
                    _stream(layout, out), o)
    return _run(layout, "row_train", v, layout.rows_per_chunk, layout.channels, layout.inner,
                layout.counts, layout.blocks, running_mean, running_var, factor, weight, bias,
                eps, relu, o)


def evaluate(x, layout, mean, var, weight, bias, eps, relu, out):
    """Forward with given statistics (float arrays (C,)) into ``out``; returns invstd."""
    v, o = x.reshape(layout.view), out.reshape(layout.view)
    if layout.planes:
        return _run(layout, "plane_eval", v, PLANE_CHUNK, mean, var, weight, bias, eps, relu,
                    _stream(layout, out), o)
    return _run(layout, "row_eval", v, layout.channels, layout.inner, mean, var, weight, bias,
                eps, relu, o)


def backward(dy, x, layout, mask, mean, invstd, weight, training, out):
    """Input gradient into ``out`` (through the batch statistics if
    ``training``) and ``(dweight, dbias)`` in ``x``'s dtype; ``mean`` and
    ``invstd`` float64 (C,)."""
    g, v, o = dy.reshape(layout.view), x.reshape(layout.view), out.reshape(layout.view)
    m = _view(mask, layout)
    if layout.planes:
        return _run(layout, "plane_backward", g, v, m, mean, invstd, weight, training,
                    PLANE_CHUNK, float(layout.count), layout.by_channel, _stream(layout, out), o)
    return _run(layout, "row_backward", g, v, m, mean, invstd, weight, training,
                layout.rows_per_chunk, layout.channels, layout.inner, layout.blocks,
                float(layout.count), o)
