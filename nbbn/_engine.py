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

#: Values a thread is given at least: a call uses ``work // GRAIN`` threads at
#: most (its *team*, capped by ``numba.get_num_threads()``), and inputs of
#: fewer than ``2 * GRAIN`` values run the serial twins of the kernels (the same
#: tasks in the same order, so the same bits): waking threads costs more than
#: they save there, and far more on a busy machine.
GRAIN = 1 << 15
#: Forward calls (statistics, output: one array read per value) give each
#: thread twice that: measured paired at 2 threads (TBB), a training forward
#: of 64-96 Ki values took 0.69-0.76 of its time on one thread, and of 128 Ki
#: the same time, where a backward (two arrays read per value, more arithmetic)
#: took 1.10-1.23 times its time on one thread.
FORWARD_GRAIN = 2 * GRAIN
#: Planes longer than this are cut into equal chunks of at most this many
#: elements: half a grain, so that any team gets two tasks a thread.
PLANE_CHUNK = GRAIN // 2
#: Rows layout: chunks of rows enough for two tasks a thread of up to this
#: many threads, where the rows allow; blocks of channels make up the rest.
MAX_TASKS = 128
#: Values of a rows statistics task, at most where the shape allows: a task
#: reads its rows twice (sums, then squared deviations), the second time
#: from the core's L2.
ROW_CHUNK = 1 << 17
#: Rows of the view in a chunk of rows, at least: each chunk folds its
#: per-column sums into per-channel states, about the cost of a few rows.
MIN_ROWS = 32
#: Partial states (chunks of rows x channels) of a rows layout, at most,
#: unless ``ROW_CHUNK`` needs more: past about 1 MiB of them per call, glibc
#: hands the freed memory back to the system and the next call faults every
#: page in again (measured here: (4096, 1024) statistics took twice as long
#: with 64 chunks of rows as with 32).
MAX_STATES = 1 << 15
#: Planes shorter than this are read row by row instead: (N, C * M) rows, whose
#: column sums give the statistics (a task a plane of M values cost more:
#: at 8 x 8 a training forward took 2.6 times as long, at 10 x 10 1.9 times,
#: the backward 1.1 and 0.7 times; at 12 x 12, 1.4 and 0.65, measured), and
#: whose outputs are written by channel runs (kernels.py).
MIN_PLANE = 128
#: Narrow rows are tiled up to this many columns so inner loops stay long.
TILE_WIDTH = 1024


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
#: Rows layout: chunks of rows are split into blocks of channels at least
#: this many columns wide (shorter rows of blocks cost more than they gain).
MIN_BLOCK_WIDTH = 128

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

    What decides the bits is a function of the shape alone, never of the
    thread count: the chunks of planes and of rows, whose partial states are
    merged in order, so every thread count gives the same results. A call
    adds what does not change the bits for its team of threads (see
    :meth:`blocks_for`, :meth:`by_channel_for`).

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
    chunk: int  # planes: elements of a task's span (the last of a plane may be shorter)
    parts: int  # rows: chunks of rows (of nearly equal sizes)
    blocks: int  # rows: blocks of channels per chunk of rows, at least
    max_blocks: int  # rows: blocks of channels per chunk of rows, at most
    max_team: int  # threads the input pays for (1: the serial kernels)
    stream: bool  # outputs are written with non-temporal stores (planes)
    by_channel: bool  # planes: small enough for a task per channel (training, backward)

    @property
    def serial(self):
        """The kernels run in the calling thread, whatever the thread count."""
        return self.max_team == 1

    def team(self, threads, grain=GRAIN):
        """Threads a call uses when ``threads`` are allowed, each given
        ``grain`` values at least (``FORWARD_GRAIN`` for a forward)."""
        return max(1, min(threads, self.max_team, self.count * self.channels // grain))

    def blocks_for(self, team):
        """Rows: blocks of channels per chunk of rows for ``team`` threads,
        two tasks a thread where the channels allow (columns are
        independent: any number gives the same bits)."""
        if team == 1:
            return self.blocks
        return max(self.blocks, min(self.max_blocks, -(-2 * team // self.parts)))

    def by_channel_for(self, team):
        """Planes: a task per channel, statistics and output in one parallel
        region, where each thread of ``team`` gets two channels (the same
        bits as the task per chunk of a plane)."""
        return self.by_channel and team > 1 and self.channels >= 2 * team


@functools.lru_cache(maxsize=512)
def layout_of(shape, axis, itemsize=4):
    """The kernel layout of an array of ``shape`` with channels on ``axis``
    and ``itemsize`` bytes per element (see :class:`Layout`)."""
    channels = shape[axis]
    work = math.prod(shape)
    count = work // channels
    nbytes = work * itemsize
    max_team = max(1, work // GRAIN)
    stream = nbytes > (STREAM_MIN_BYTES if STREAM_MIN_BYTES is not None
                       else last_level_cache_bytes())
    if axis == 1 and len(shape) > 2 and math.prod(shape[2:]) >= MIN_PLANE:
        view = (shape[0], channels, math.prod(shape[2:]))
        k = -(-view[2] // PLANE_CHUNK)  # equal chunks of at most PLANE_CHUNK
        chunk = -(-view[2] // k)
        sizes = np.full(k, chunk, dtype=np.float64)
        sizes[-1] = view[2] - chunk * (k - 1)
        return Layout(view, True, channels, view[2], count, _frozen(np.tile(sizes, view[0])),
                      chunk, 0, 1, 1, max_team, stream, nbytes <= BY_CHANNEL_MAX_BYTES)
    if axis == 1 and len(shape) > 2:
        inner = math.prod(shape[2:])
        rows, width = shape[0], channels * inner
    else:
        inner, rows, width = 1, count, channels
    # Largest power of two dividing ``rows`` that keeps the tile narrow.
    tile = min(rows & -rows, 1 << max(0, (TILE_WIDTH // width).bit_length() - 1))
    view = (rows // tile, width * tile)
    max_blocks = max(1, min(channels * inner // MIN_BLOCK_WIDTH, channels))
    parts, blocks = _row_split(view, channels, max_blocks, max_team)
    # Fewer threads, not smaller tasks: two tasks a thread at most.
    max_team = max(1, min(max_team, parts * max_blocks // 2))
    per_row = view[1] // channels
    sizes = np.array([((p + 1) * view[0] // parts - p * view[0] // parts) * per_row
                      for p in range(parts)], dtype=np.float64)
    return Layout(view, False, channels, inner, count, _frozen(sizes), 0, parts, blocks,
                  max_blocks, max_team, False, False)


def _row_split(view, channels, max_blocks, max_team):
    """``(parts, blocks)``: chunks of rows of nearly equal sizes, and the
    blocks of channels each is cut into at least. Chunks of at least
    ``MIN_ROWS`` rows, enough for two tasks a thread of the largest team
    (up to ``MAX_TASKS``) where the rows and ``MAX_STATES`` allow; tasks of
    at most ``ROW_CHUNK`` values, with blocks of channels first, then more
    chunks, where the shape allows."""
    rows, width = view
    work = rows * width
    if max_team == 1:
        return 1, 1
    most = max(1, rows // MIN_ROWS)
    l2 = -(-work // ROW_CHUNK)  # tasks small enough for a core's L2
    parts = min(most, max(1, MAX_STATES // channels), max(l2, min(MAX_TASKS, 2 * max_team)))
    blocks = min(max_blocks, -(-l2 // parts))
    parts = min(most, max(parts, -(-l2 // blocks)))
    return parts, blocks


def _frozen(a):
    a.flags.writeable = False
    return a


def tasks_of(layout, team=1):
    """Values of each statistics task of ``layout`` for a team of ``team``
    threads, in task order (the plan the tests check; pure Python)."""
    if layout.planes:
        n, c, m = layout.view
        k = -(-m // layout.chunk)
        spans = [min(layout.chunk, m - q * layout.chunk) for q in range(k)]
        if layout.by_channel_for(team):
            return [sum(spans) * n] * c
        return spans * (n * c)
    rows, width = layout.view
    tiles = width // (layout.channels * layout.inner)
    blocks = layout.blocks_for(team)
    out = []
    for p in range(layout.parts):
        r = (p + 1) * rows // layout.parts - p * rows // layout.parts
        for q in range(blocks):
            c = (q + 1) * layout.channels // blocks - q * layout.channels // blocks
            out.append(r * tiles * c * layout.inner)
    return out


#: ``numba.get_num_threads`` and ``numba.set_num_threads``, or the faster
#: functions of the threading layer they call (see
#: :func:`nbbn._threads.thread_count_functions`); bound on the first parallel call.
_get_threads = _set_threads = None


def _crew(layout, grain=GRAIN):
    """``(team, threads)``: the threads a call on ``layout`` uses (see
    :meth:`Layout.team`), and the caller's ``numba.get_num_threads()`` (its
    cap, restored after the call); a team of 1 runs the serial twins (also
    in a child forked from GNU OpenMP threads, see :mod:`nbbn._threads`)."""
    global _get_threads, _set_threads
    if layout.max_team == 1 or not _threads.parallel_ok:
        return 1, 1
    if _get_threads is None:
        kernels()
        _get_threads, _set_threads = _threads.thread_count_functions()
    threads = _get_threads()
    return layout.team(threads, grain), threads


def _run(crew, name, *args):
    """Call kernel ``name`` on ``crew[0]`` threads (``numba.set_num_threads``
    for the call where that is fewer than the caller's ``crew[1]``), or its
    serial twin for one."""
    team, threads = crew
    k = kernels()
    if team == 1:
        return getattr(k, name + "_serial")(*args)
    kernel = getattr(k, name)
    lock = _threads.lock
    if team < threads:
        _set_threads(team)
    try:
        if lock is None:
            return kernel(*args)
        with lock:
            result = kernel(*args)
            if _threads.layer() is None:
                _threads.started()
        return result
    finally:
        if team < threads:
            _set_threads(threads)


def _stream(layout, out):
    return layout.stream and out.flags.aligned


def merge_moments(counts, means, m2s):
    """Merge partial ``(count, mean, M2)`` states in order (Chan): (mean, M2)."""
    return kernels().merge_moments(counts, means, m2s)


def update_running(running_mean, running_var, mean, unbiased_var, factor):
    """``running = (1 - factor) * running + factor * batch``, in place, unless
    the batch statistics are not finite; return whether it updated."""
    return kernels().update_running(running_mean, running_var, mean, unbiased_var, factor)


# Per-channel arrays reach the kernels in few types, so that each kernel
# compiles few variants (the float32 / float64 / None combinations of weight,
# bias and running statistics made the test suite compile 540 kernels, most of
# CI's time): None as ones (weight), zeros (bias) or empty arrays (running
# statistics); float32 and half arrays widened to float64 for float64 inputs,
# half ones to float32 for the others; float64 arrays as they are (narrowing
# would round). Every step is exact. A layer's own arrays, in its dtype, pass
# unconverted, and the checks compare type codes (``dtype ==`` took 0.14 us a
# test; dtype instances are not unique): widening float32 ones to float64 in
# every call cost 0.4-0.8 us an array (a (64, 128) float32 evaluation takes
# 10-12 us).

@functools.lru_cache(maxsize=64)
def _filled(channels, code, value):
    return np.full(channels, value, code)  # shared: the kernels never write it


def _per_channel(v, channels, code="d", fill=0.0):
    """``v`` (None or a float array (C,)) as the kernels take it (see above),
    ``code`` "d" (float64) or "f" (float32)."""
    if v is None:
        return _filled(channels, code, fill)
    k = v.dtype.char
    return v if k == code or k == "d" else v.astype(code)


def _param_code(x):
    return "d" if x.dtype.char == "d" else "f"


def backward_coefficients(s_dy, s_dyx, invstd, weight, count):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` (float64 (C,)) from
    ``s_dy = sum(dy)``, ``s_dyx = sum(dy * (x - mean))`` over ``count`` values."""
    w = _per_channel(weight, invstd.shape[0], fill=1.0)
    return kernels().backward_coefficients(s_dy, s_dyx, invstd, w, float(count))


# --- one pass over the data ---------------------------------------------------

def moments(x, layout):
    """Per-channel mean and biased variance (float64) in one pass over ``x``."""
    v, crew = x.reshape(layout.view), _crew(layout, FORWARD_GRAIN)
    if layout.planes:
        return _run(crew, "plane_moments", v, layout.chunk, layout.counts)
    return _run(crew, "row_moments", v, layout.parts, layout.channels, layout.inner,
                layout.counts, layout.blocks_for(crew[0]))


def _view(a, layout):
    return None if a is None else a.reshape(layout.view)


def affine(x, layout, scale, shift, out, *, relu=False, mask=None):
    """``out = x * scale + shift`` per channel; coefficients float64 (C,).

    ``relu``: ``out = max(x * scale + shift, 0)`` in the same pass.
    ``mask`` (an array like ``x``): ``out`` is 0 where ``mask > 0`` is false.
    """
    v, o, m = x.reshape(layout.view), out.reshape(layout.view), _view(mask, layout)
    crew = _crew(layout, FORWARD_GRAIN)
    if layout.planes:
        _run(crew, "plane_affine", v, scale, shift, layout.chunk, bool(relu), m,
             _stream(layout, out), o)
    else:
        _run(crew, "row_affine", v, scale, shift, layout.channels, layout.inner, bool(relu), m,
             o)
    return out


def grad_sums(x, dy, layout, mean, *, mask=None):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` in one pass, where
    ``g`` is ``dy``, or ``dy`` where ``mask > 0`` and 0 elsewhere."""
    v, g, m = x.reshape(layout.view), dy.reshape(layout.view), _view(mask, layout)
    crew = _crew(layout)
    if layout.planes:
        return _run(crew, "plane_grad_sums", v, g, m, mean, layout.chunk)
    return _run(crew, "row_grad_sums", v, g, m, mean, layout.parts, layout.channels,
                layout.inner, layout.blocks_for(crew[0]))


def grad_input(dy, x, layout, a, b, c, mean, out, *, mask=None):
    """``out = g * a + (x - mean) * b + c`` per channel, ``g`` as in :func:`grad_sums`."""
    g, v, o = dy.reshape(layout.view), x.reshape(layout.view), out.reshape(layout.view)
    m, crew = _view(mask, layout), _crew(layout)
    if layout.planes:
        _run(crew, "plane_grad_input", g, v, m, a, b, c, mean, layout.chunk,
             _stream(layout, out), o)
    else:
        _run(crew, "row_grad_input", g, v, m, a, b, c, mean, layout.channels, layout.inner, o)
    return out


# --- a whole forward or backward in one call -------------------------------------

def train(x, layout, running_mean, running_var, factor, weight, bias, eps, relu, out):
    """Training forward into ``out``: ``(mean, invstd, updated)``, float64
    batch statistics; the running statistics (None, or updated in place unless
    the batch's are not finite) move by ``factor``."""
    v, o, crew = x.reshape(layout.view), out.reshape(layout.view), _crew(layout, FORWARD_GRAIN)
    c, p = layout.channels, _param_code(x)
    w, b = _per_channel(weight, c, p, 1.0), _per_channel(bias, c, p)
    if running_mean is None:  # (the kernels take empty arrays)
        running_mean = running_var = _filled(0, p, 0.0)
    if layout.planes:
        return _run(crew, "plane_train", v, layout.chunk, layout.counts, running_mean,
                    running_var, factor, w, b, eps, relu, layout.by_channel_for(crew[0]),
                    _stream(layout, out), o)
    return _run(crew, "row_train", v, layout.parts, c, layout.inner, layout.counts,
                layout.blocks_for(crew[0]), running_mean, running_var, factor, w, b, eps, relu,
                o)


def evaluate(x, layout, mean, var, weight, bias, eps, relu, out):
    """Forward with given statistics (float arrays (C,)) into ``out``; returns invstd."""
    v, o, crew = x.reshape(layout.view), out.reshape(layout.view), _crew(layout, FORWARD_GRAIN)
    c, p = layout.channels, _param_code(x)
    mean, var = _per_channel(mean, c, p), _per_channel(var, c, p)
    w, b = _per_channel(weight, c, p, 1.0), _per_channel(bias, c, p)
    if layout.planes:
        return _run(crew, "plane_eval", v, layout.chunk, mean, var, w, b, eps, relu,
                    _stream(layout, out), o)
    return _run(crew, "row_eval", v, c, layout.inner, mean, var, w, b, eps, relu, o)


def backward(dy, x, layout, mask, mean, invstd, weight, training, out):
    """Input gradient into ``out`` (through the batch statistics if
    ``training``) and ``(dweight, dbias)`` in ``x``'s dtype; ``mean`` and
    ``invstd`` float64 (C,)."""
    g, v, o = dy.reshape(layout.view), x.reshape(layout.view), out.reshape(layout.view)
    m, crew, c = _view(mask, layout), _crew(layout), layout.channels
    w = _per_channel(weight, c, _param_code(x), 1.0)
    if layout.planes:
        return _run(crew, "plane_backward", g, v, m, mean, invstd, w, training, layout.chunk,
                    float(layout.count), layout.by_channel_for(crew[0]), _stream(layout, out),
                    o)
    return _run(crew, "row_backward", g, v, m, mean, invstd, w, training, layout.parts, c,
                layout.inner, layout.blocks_for(crew[0]), float(layout.count), o)
