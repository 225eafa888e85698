"""Numba CUDA kernels for batch normalization: the passes over the data, the
GPU twins of ``nbbn.kernels``; loops and nothing else (launches live in
``nbbn.gpu.backend``, the per-channel math in ``nbbn.gpu.channel_kernels``).
Importing this module imports ``numba.cuda``; ``nbbn`` does so on first GPU use.

A training forward is two launches (:func:`moments`, then :func:`normalize`),
an evaluation forward one (:func:`normalize`), a backward two
(:func:`grad_sums`, then :func:`grad_input`). The one-block kernels that
update running statistics elsewhere (:func:`running_update`, :func:`renorm`)
are here too: every kernel whose threads work together (shared memory,
barriers, atomics) lives in this module with the device functions it calls,
the per-channel math in ``nbbn.gpu.channel_kernels``.

**Geometry.** Every kernel takes the input flat (1-D) and a tuple ``geo``
(``nbbn.gpu.backend.plan_of``): ``(channel, C, inner, width, extent, span,
group, chunk, parts, cinner, lanes)``. Block ``b`` takes part ``b % parts`` of
tile ``b // parts``; a tile has ``span`` columns, and ``group`` lanes share a
column, so a block runs ``span * group <= lanes`` lanes. Two layouts:

* channel (``channel = 1``, ``(N, C, inner)`` inputs with ``inner`` of a
  warp or more): a tile is one channel, ``span = 1``, ``group = lanes``; its
  ``extent = N * inner`` values, in ``(n, i)`` order, are cut into ``parts``
  parts of ``chunk`` values; lane ``l`` takes values ``l, l + lanes, ...`` of
  its part (consecutive lanes read consecutive addresses). A lane steps from
  one value to the next without a division (:func:`_next`).
* rows (``channel = 0``, ``(R, width)`` views: ``(N, C)``, channels last, small
  planes): column ``j`` is in channel ``j // cinner``; a tile is ``span``
  whole channels' columns (a warp reads consecutive columns of a row); a part
  is ``chunk`` rows, and lane ``(j, q)`` takes rows ``q, q + group, ...`` of it.

**Statistics.** A lane sums ``x - k`` and ``(x - k)**2`` over its values in
float64, ``k`` being its first value, four loads in flight, no division;
then ``M2 = s2 - s1**2 / n``. As ``k`` is one of the values, ``n * (mean -
k)**2 <= M2``: the subtraction loses at most ``log2(n + 1)`` bits (``n`` is a
lane's run, about 32). A constant channel gives exactly ``M2 = 0`` and
``mean = k``. The (count, mean, M2) states are then merged with Chan's
formula: the lanes of a column by a fixed tree (:func:`_tree_states`), the
block writes one partial state per column, and the **last block of a tile to
finish** (an integer ticket per tile, ``cuda.atomic.add``; no float atomics)
merges the tile's partial states in a fixed order and writes its channels'
mean and variance; the last tile to finish then updates the running
statistics (:func:`_update_running`). Each ticket is reset
by the block that completes it, for the next launch. Results depend on the
shape and ``lanes`` only, never on the threads per block, the order in which
blocks run, or the device: bitwise repeatable.

Values are converted to float64 as loaded (explicitly: the simulator runs
NumPy, where float32 + Python float stays float32). The normalization is
written ``(x - mean) * scale + shift`` so that a contracted multiply-add
(CUDA's default) still gives exactly 0 for a constant channel.

The fused ReLU takes two flags, as on the CPU: ``relu`` clamps the
normalization's output at 0 (NaN stays NaN); ``masked`` makes the gradient
kernels treat ``dy`` as 0 where the saved output ``mask`` is not ``> 0``.
Without a mask the input itself is passed as ``mask`` (never read), so that
each kernel has one signature per dtype.
"""
import math

from numba import cuda, float64, int32

from .channel_kernels import (_min, input_gradient, normalization, renorm_corrections,
                              renorm_moving, running)

#: Size of the shared arrays: the most lanes a launch may use.
MAX_LANES = 256


@cuda.jit(device=True)
def _output(v, relu):
    """The value to store: ``max(v, 0)`` if ``relu`` (NaN stays NaN)."""
    if relu and v < 0.0:
        return 0.0
    return v


@cuda.jit(device=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) states (Chan et al.); an empty one is the other."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    w = n_b / n
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@cuda.jit(device=True)
def _state(count, k, s1, s2):
    """The (count, mean, M2) state of ``count`` values whose deviations from
    ``k``, one of them, sum to ``s1`` and their squares to ``s2``."""
    if count == 0:
        return 0.0, 0.0, 0.0
    n = float64(count)
    d = s1 / n
    m2 = s2 - s1 * d
    return n, k + d, 0.0 if m2 < 0.0 else m2  # (rounding; NaN stays NaN)


@cuda.jit(device=True)
def _next(f, i, jump, r, inner, wrap):
    """The flat index (and index in its plane) of a lane's next value."""
    i += r
    f += jump
    if i >= inner:
        return f + wrap, i - inner
    return f, i


@cuda.jit(device=True)
def _next4(f, i, jump, r, inner, wrap):
    """The flat indices of a lane's four values from ``x[f]`` on, then the
    index (and index in its plane) of the value after them."""
    f1, i = _next(f, i, jump, r, inner, wrap)
    f2, i = _next(f1, i, jump, r, inner, wrap)
    f3, i = _next(f2, i, jump, r, inner, wrap)
    f4, i = _next(f3, i, jump, r, inner, wrap)
    return f, f1, f2, f3, f4, i


@cuda.jit(device=True)
def _lane(geo, b, lane):
    """``(column, f, i, count, jump, r, inner, wrap)``: the column of lane
    ``lane`` of block ``b``, its first value ``x[f]`` (``i`` in its plane), how
    many values it takes, and how :func:`_next` steps to the next one."""
    channel, channels, inner, width, extent, span, group, chunk, parts, _, lanes = geo
    tile = b // parts
    lo = (b - tile * parts) * chunk
    hi = _min(lo + chunk, extent)
    if channel:
        p = lo + lane
        count = (hi - p + lanes - 1) // lanes if p < hi else 0
        n = p // inner
        i = p - n * inner
        q = lanes // inner
        r = lanes - q * inner
        return tile, (n * channels + tile) * inner + i, i, count, q * width + r, r, inner, \
            width - inner
    col = tile * span + lane % span
    q = lane // span
    r0 = lo + q
    count = (hi - r0 + group - 1) // group if col < width and q < group and r0 < hi else 0
    return col, r0 * width + col, 0, count, group * width, 0, 1, 0


@cuda.jit(device=True)
def _columns(geo):
    """Columns of the partial states: the channels, or the rows' width."""
    return geo[1] if geo[0] else geo[3]


@cuda.jit(device=True)
def _moments_run(x, f, i, count, jump, r, inner, wrap):
    """(count, mean, M2) of a lane's values (see the module docstring)."""
    if count == 0:
        return 0.0, 0.0, 0.0
    k = float64(x[f])
    s1, s2 = 0.0, 0.0
    t = 0
    while t + 4 <= count:
        f0, f1, f2, f3, f, i = _next4(f, i, jump, r, inner, wrap)
        d0 = float64(x[f0]) - k
        d1 = float64(x[f1]) - k
        d2 = float64(x[f2]) - k
        d3 = float64(x[f3]) - k
        s1 += (d0 + d1) + (d2 + d3)
        s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        t += 4
    while t < count:
        d = float64(x[f]) - k
        s1 += d
        s2 += d * d
        f, i = _next(f, i, jump, r, inner, wrap)
        t += 1
    return _state(count, k, s1, s2)


@cuda.jit(device=True)
def _affine_run(x, out, mu, a, b, relu, f, i, count, jump, r, inner, wrap):
    """``out = (x - mu) * a + b`` (clamped at 0 with ``relu``) over a lane's values."""
    t = 0
    while t + 4 <= count:
        f0, f1, f2, f3, f, i = _next4(f, i, jump, r, inner, wrap)
        v0, v1, v2, v3 = float64(x[f0]), float64(x[f1]), float64(x[f2]), float64(x[f3])
        out[f0] = _output((v0 - mu) * a + b, relu)
        out[f1] = _output((v1 - mu) * a + b, relu)
        out[f2] = _output((v2 - mu) * a + b, relu)
        out[f3] = _output((v3 - mu) * a + b, relu)
        t += 4
    while t < count:
        out[f] = _output((float64(x[f]) - mu) * a + b, relu)
        f, i = _next(f, i, jump, r, inner, wrap)
        t += 1


@cuda.jit(device=True)
def _g(dy, mask, masked, f):
    """``dy[f]`` as float64, or 0 where ``masked`` and ``mask[f] > 0`` is false."""
    if masked and not mask[f] > 0:
        return 0.0
    return float64(dy[f])


@cuda.jit(device=True)
def _grad_run(x, dy, mask, masked, mu, f, i, count, jump, r, inner, wrap):
    """``(sum(g), sum(g * (x - mu)))`` over a lane's values."""
    a, b = 0.0, 0.0
    t = 0
    while t + 4 <= count:
        f0, f1, f2, f3, f, i = _next4(f, i, jump, r, inner, wrap)
        g0, g1 = _g(dy, mask, masked, f0), _g(dy, mask, masked, f1)
        g2, g3 = _g(dy, mask, masked, f2), _g(dy, mask, masked, f3)
        x0, x1, x2, x3 = float64(x[f0]), float64(x[f1]), float64(x[f2]), float64(x[f3])
        a += (g0 + g1) + (g2 + g3)
        b += (g0 * (x0 - mu) + g1 * (x1 - mu)) + (g2 * (x2 - mu) + g3 * (x3 - mu))
        t += 4
    while t < count:
        g = _g(dy, mask, masked, f)
        a += g
        b += g * (float64(x[f]) - mu)
        f, i = _next(f, i, jump, r, inner, wrap)
        t += 1
    return a, b


@cuda.jit(device=True)
def _grad_input_run(dy, x, mask, masked, training, ka, kb, kc, mu, out, f, i, count, jump, r,
                    inner, wrap):
    """``out = g * ka + (x - mu) * kb + kc`` over a lane's values (``g * ka``,
    ``x`` unread, without ``training``)."""
    t = 0
    while t + 4 <= count:
        f0, f1, f2, f3, f, i = _next4(f, i, jump, r, inner, wrap)
        g0, g1 = _g(dy, mask, masked, f0), _g(dy, mask, masked, f1)
        g2, g3 = _g(dy, mask, masked, f2), _g(dy, mask, masked, f3)
        if training:
            x0, x1, x2, x3 = float64(x[f0]), float64(x[f1]), float64(x[f2]), float64(x[f3])
            out[f0] = g0 * ka + (x0 - mu) * kb + kc
            out[f1] = g1 * ka + (x1 - mu) * kb + kc
            out[f2] = g2 * ka + (x2 - mu) * kb + kc
            out[f3] = g3 * ka + (x3 - mu) * kb + kc
        else:
            out[f0], out[f1], out[f2], out[f3] = g0 * ka, g1 * ka, g2 * ka, g3 * ka
        t += 4
    while t < count:
        g = _g(dy, mask, masked, f)
        out[f] = g * ka + (float64(x[f]) - mu) * kb + kc if training else g * ka
        f, i = _next(f, i, jump, r, inner, wrap)
        t += 1


@cuda.jit(device=True)
def _top(group):
    """The largest power of two below ``group`` (0 for 1): a tree's first stride."""
    h = 1
    while h < group:
        h *= 2
    return h // 2


@cuda.jit(device=True)
def _tree_states(shn, shm, shq, span, group):
    """Merge the ``group`` states of each of ``span`` columns (lane ``j + q *
    span``) into lane ``j``, by a fixed tree."""
    h = _top(group)
    while h > 0:
        cuda.syncthreads()
        for lane in range(cuda.threadIdx.x, span * h, cuda.blockDim.x):
            if lane // span + h < group:
                o = lane + h * span
                shn[lane], shm[lane], shq[lane] = _chan(shn[lane], shm[lane], shq[lane],
                                                        shn[o], shm[o], shq[o])
        h //= 2
    cuda.syncthreads()


@cuda.jit(device=True)
def _tree_sums(sa, sb, span, group):
    """:func:`_tree_states` for pairs of sums."""
    h = _top(group)
    while h > 0:
        cuda.syncthreads()
        for lane in range(cuda.threadIdx.x, span * h, cuda.blockDim.x):
            if lane // span + h < group:
                sa[lane] += sa[lane + h * span]
                sb[lane] += sb[lane + h * span]
        h //= 2
    cuda.syncthreads()


@cuda.jit(device=True)
def _arrive(tickets, slot, amount, total, flag):
    """Add ``amount`` to ``tickets[slot]`` once for the block, after its
    writes; whether that completed ``total`` (then the ticket is reset, and
    every write of the blocks counted before is visible to this block). The
    same answer in every thread."""
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        done = cuda.atomic.add(tickets, slot, amount) + amount
        flag[0] = 1 if done == total else 0
        if done == total:
            tickets[slot] = 0
    cuda.syncthreads()
    last = flag[0] == 1
    if last:
        cuda.threadfence()
    return last


@cuda.jit(device=True)
def _all_finite(mean, var, lanes):
    """1 if every ``mean[c]`` and ``var[c]`` is finite, else 0, for every
    thread of the (single) block."""
    flags = cuda.shared.array(MAX_LANES, int32)
    for lane in range(cuda.threadIdx.x, lanes, cuda.blockDim.x):
        f = 1
        for c in range(lane, mean.shape[0], lanes):
            if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
                f = 0
        flags[lane] = f
    cuda.syncthreads()
    good = 1
    for lane in range(lanes):
        good = _min(good, flags[lane])
    return good


@cuda.jit(device=True)
def _factor(momentum, counts):
    """The weight of a batch in a running average: ``momentum``, or the
    cumulative ``1 / (updates + 1)`` when ``momentum`` is negative (None)."""
    return momentum if momentum >= 0.0 else 1.0 / float64(counts[0] + 1)


@cuda.jit(device=True)
def _count(counts, good):
    """``counts[0] += 1`` (an update) or ``counts[1] += 1`` (a batch skipped),
    by thread 0, after every thread has read ``counts``."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        counts[0] += good
        counts[1] += 1 - good


@cuda.jit(device=True)
def _update_running(running_mean, running_var, mean, var, k, momentum, counts, lanes, moving):
    """By one block: if every ``mean`` and ``var`` is finite, move the running
    statistics towards them by :func:`_factor`, in place: batch norm's update
    (``nbbn.gpu.channel_kernels.running``, the variance times ``k``, the
    correction) or, with ``moving``, Batch Renormalization's (``renorm_moving``,
    ``k`` is eps); then count the update or the skipped batch."""
    good = _all_finite(mean, var, lanes)
    factor = _factor(momentum, counts)
    if good == 1:
        for c in range(cuda.threadIdx.x, mean.shape[0], cuda.blockDim.x):
            if moving:
                running_mean[c], running_var[c] = renorm_moving(running_mean, running_var, mean,
                                                                var, k, factor, c)
            else:
                running_mean[c], running_var[c] = running(running_mean, running_var, mean, var,
                                                          k, factor, c)
    _count(counts, good)


@cuda.jit
def running_update(running_mean, running_var, mean, var, correction, momentum, counts, lanes):
    """:func:`_update_running` as a kernel of one block (statistics from
    elsewhere, e.g. merged over MPI ranks)."""
    _update_running(running_mean, running_var, mean, var, correction, momentum, counts, lanes,
                    False)


@cuda.jit
def renorm(mean, var, running_mean, running_var, weight, bias, has_affine, has_bias, eps, rmin,
           rmax, dmax, momentum, counts, lanes, out):
    """One block: Batch Renormalization's ``out[0:4] = r, d, w, shift`` per
    channel (``nbbn.gpu.channel_kernels.renorm_corrections``); then, if every
    ``mean`` and ``var`` is finite, the moving statistics' update in place
    (:func:`_update_running`)."""
    for c in range(cuda.threadIdx.x, mean.shape[0], cuda.blockDim.x):
        out[0, c], out[1, c], out[2, c], out[3, c] = renorm_corrections(
            mean, var, running_mean, running_var, weight, bias, has_affine, has_bias, eps, rmin,
            rmax, dmax, c)
    cuda.syncthreads()  # every channel has read the moving statistics
    _update_running(running_mean, running_var, mean, var, eps, momentum, counts, lanes, True)


@cuda.jit(device=True)
def _publish(states, a, b, geo, tickets, flag):
    """Write the block's state of each of its columns (lane ``j``: ``a[j]``,
    ``b[j]``) as their part ``blockIdx.x % parts``, then :func:`_arrive` at its
    tile's ticket: whether this block is the last of its tile."""
    columns, span, parts = _columns(geo), geo[5], geo[8]
    tile = cuda.blockIdx.x // parts
    part = cuda.blockIdx.x - tile * parts
    for lane in range(cuda.threadIdx.x, span, cuda.blockDim.x):
        if tile * span + lane < columns:
            states[0, tile * span + lane, part] = a[lane]
            states[1, tile * span + lane, part] = b[lane]
    return _arrive(tickets, tile, 1, parts, flag)


@cuda.jit
def moments(x, geo, states, tickets, stats, running_mean, running_var, track, momentum,
            correction, counts):
    """Per-channel mean and biased variance of ``x`` into ``stats[0]`` and
    ``stats[1]`` (float64); with ``track``, then the running update
    (:func:`_update_running`). ``states`` (2, columns,
    >= parts) and ``tickets`` (tiles + 1, zeros) are the launch's scratch."""
    shn = cuda.shared.array(MAX_LANES, float64)
    shm = cuda.shared.array(MAX_LANES, float64)
    shq = cuda.shared.array(MAX_LANES, float64)
    flag = cuda.shared.array(1, int32)
    tid, tpb, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    _, channels, _, _, extent, span, group, chunk, parts, cinner, lanes = geo
    for lane in range(tid, lanes, tpb):
        _, f, i, count, jump, r, inner, wrap = _lane(geo, b, lane)
        shn[lane], shm[lane], shq[lane] = _moments_run(x, f, i, count, jump, r, inner, wrap)
    _tree_states(shn, shm, shq, span, group)
    if not _publish(states, shm, shq, geo, tickets, flag):
        return
    # the last block of the tile: its columns' parts, in order, then its channels
    columns = _columns(geo)
    col0 = b // parts * span
    for lane in range(tid, span * group, tpb):
        col = col0 + lane % span
        n, mean, m2 = 0.0, 0.0, 0.0
        if col < columns:
            for s in range(lane // span, parts, group):
                n, mean, m2 = _chan(n, mean, m2, float64(_min(chunk, extent - s * chunk)),
                                    states[0, col, s], states[1, col, s])
        shn[lane], shm[lane], shq[lane] = n, mean, m2
    _tree_states(shn, shm, shq, span, group)
    for j in range(tid * cinner, span, tpb * cinner):
        if col0 + j < columns:
            n, mean, m2 = shn[j], shm[j], shq[j]
            for u in range(j + 1, j + cinner):
                n, mean, m2 = _chan(n, mean, m2, shn[u], shm[u], shq[u])
            stats[0, (col0 + j) // cinner] = mean
            stats[1, (col0 + j) // cinner] = m2 / n
    if track and _arrive(tickets, (columns + span - 1) // span,
                         (_min(col0 + span, columns) - col0) // cinner, channels, flag):
        _update_running(running_mean, running_var, stats[0], stats[1], correction, momentum,
                        counts, lanes, False)


@cuda.jit
def normalize(x, geo, mean, var, weight, bias, has_weight, has_bias, relu, eps, stats, out):
    """``out = (x - mean) * scale + shift`` per channel (``nbbn.gpu.channel_kernels.
    normalization``), clamped at 0 with ``relu``; the statistics used, as
    float64, into ``stats`` (rows mean, var, invstd)."""
    tid, tpb, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    _, _, _, _, _, span, _, _, parts, cinner, lanes = geo
    first = b % parts == 0
    for lane in range(tid, lanes, tpb):
        col, f, i, count, jump, r, inner, wrap = _lane(geo, b, lane)
        if count > 0:
            ch = col // cinner
            mu, inv, a, s = normalization(mean, var, weight, bias, has_weight, has_bias, eps, ch)
            if first and lane < span and col % cinner == 0:
                stats[0, ch], stats[1, ch], stats[2, ch] = mu, float64(var[ch]), inv
            _affine_run(x, out, mu, a, s, relu, f, i, count, jump, r, inner, wrap)


@cuda.jit
def grad_sums(x, dy, mask, masked, mean, geo, states, tickets, sums, invstd, grads, want_grads):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` into ``sums[0]`` and
    ``sums[1]`` (float64), ``g`` being ``dy``, or 0 where ``mask > 0`` is false
    if ``masked``; with ``want_grads``, the parameters' gradients ``grads[0] =
    sums[1] * invstd`` and ``grads[1] = sums[0]`` too (in ``grads``' dtype).
    Reduced as :func:`moments`, with sums for states."""
    sa = cuda.shared.array(MAX_LANES, float64)
    sb = cuda.shared.array(MAX_LANES, float64)
    flag = cuda.shared.array(1, int32)
    tid, tpb, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    _, _, _, _, _, span, group, _, parts, cinner, lanes = geo
    for lane in range(tid, lanes, tpb):
        col, f, i, count, jump, r, inner, wrap = _lane(geo, b, lane)
        mu = float64(mean[col // cinner]) if count > 0 else 0.0
        sa[lane], sb[lane] = _grad_run(x, dy, mask, masked, mu, f, i, count, jump, r, inner, wrap)
    _tree_sums(sa, sb, span, group)
    if not _publish(states, sa, sb, geo, tickets, flag):
        return
    columns = _columns(geo)
    col0 = b // parts * span
    for lane in range(tid, span * group, tpb):
        col = col0 + lane % span
        u, v = 0.0, 0.0
        if col < columns:
            for s in range(lane // span, parts, group):
                u += states[0, col, s]
                v += states[1, col, s]
        sa[lane], sb[lane] = u, v
    _tree_sums(sa, sb, span, group)
    for j in range(tid * cinner, span, tpb * cinner):
        if col0 + j < columns:
            u, v = sa[j], sb[j]
            for k in range(j + 1, j + cinner):
                u += sa[k]
                v += sb[k]
            ch = (col0 + j) // cinner
            sums[0, ch], sums[1, ch] = u, v
            if want_grads:
                grads[0, ch] = v * float64(invstd[ch])
                grads[1, ch] = u


@cuda.jit
def grad_input(dy, x, mask, masked, mean, invstd, weight, has_weight, sums, values, training,
               geo, out):
    """``out = g * a + (x - mean) * b + c`` per channel, the coefficients
    from the gradient sums over ``values`` values per channel
    (``nbbn.gpu.channel_kernels.input_gradient``), ``g`` as in :func:`grad_sums`."""
    tid, tpb, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    cinner, lanes = geo[9], geo[10]
    for lane in range(tid, lanes, tpb):
        col, f, i, count, jump, r, inner, wrap = _lane(geo, b, lane)
        if count > 0:
            ch = col // cinner
            ka, kb, kc = input_gradient(sums, invstd, weight, has_weight, values, training, ch)
            _grad_input_run(dy, x, mask, masked, training, ka, kb, kc, float64(mean[ch]), out,
                            f, i, count, jump, r, inner, wrap)
