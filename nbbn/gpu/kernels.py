"""Numba CUDA kernels for batch normalization: the GPU twins of
``nbbn.kernels``, loops and nothing else (launches live in ``nbbn.gpu.backend``):
the passes over the data here, the per-channel kernels in
``nbbn.gpu.channel_kernels``. Importing this module imports ``numba.cuda``;
``nbbn`` does so on first GPU use.

Two views of an input, as on the CPU. planes: ``x`` as ``(N, C, M)``, one block
per fixed chunk of an ``(n, c)`` plane. rows: ``x`` as ``(R, W)``, ``W = C * inner``
columns, column ``j`` in channel ``j // inner``; one block per (column tile,
chunk of rows), lanes own columns, and when ``W`` is narrower than a block
``group = lanes // W`` lanes share a column, each taking every group-th row.

Reductions run over ``lanes`` logical lanes in shared memory whatever the
threads per block (thread ``t`` plays lanes ``t, t + blockDim, ...``) and fold
by a fixed tree. For the statistics each lane takes two passes over its few
elements (mean, then squared deviations, from cache); lane states, then the
per-block partial states, are merged with Chan's formula in a fixed order. No
float atomics: results depend on the shape and ``lanes`` only, never on the
threads per block or the device. Values are converted to float64 as loaded
(explicitly: the simulator runs NumPy, where float32 + Python float stays
float32); all arithmetic is float64. The normalization is written
``(x - mean) * scale + shift`` so that a contracted multiply-add (CUDA's
default) still gives exactly 0 for a constant channel.

The fused ReLU takes two flags, as on the CPU: ``relu`` clamps the
normalization's output at 0 (NaN stays NaN); ``masked`` makes the gradient
kernels (and the eval backward's affine pass) treat ``dy`` as 0 where the saved
output ``mask`` is not ``> 0``. Without a mask the input itself is passed as
``mask`` (never read), so that each kernel has one signature per dtype.
"""
from numba import cuda, float64

#: Size of the shared arrays: the most lanes a launch may use.
MAX_LANES = 256


@cuda.jit(device=True)
def _min(a, b):
    # Written out: numba 0.68's built-in CUDA target compiles min/max through
    # an overload that needs a live GPU even for compile_ptx.
    return a if a < b else b


@cuda.jit(device=True)
def _max(a, b):
    return a if a > b else b


@cuda.jit(device=True)
def _output(v, relu, dropped):
    """The value to store: 0 if ``dropped``, ``max(v, 0)`` if ``relu`` (NaN stays NaN)."""
    if dropped or (relu and v < 0.0):
        return 0.0
    return v


@cuda.jit(device=True)
def _tree_sum2(sa, sb, lanes):
    """Fold ``sa[:lanes]`` and ``sb[:lanes]`` into their lane 0, in a fixed order."""
    s = lanes // 2
    while s > 0:
        cuda.syncthreads()
        for lane in range(cuda.threadIdx.x, s, cuda.blockDim.x):
            sa[lane] += sa[lane + s]
            sb[lane] += sb[lane + s]
        s //= 2
    cuda.syncthreads()


@cuda.jit(device=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) states (Chan et al.)."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    delta = mean_b - mean_a
    w = n_b / n
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@cuda.jit(device=True)
def _plane_block(x, chunk):
    """(n, c, lo, hi) of this block's chunk of an (N, C, M) view."""
    channels = x.shape[1]
    m = x.shape[2]
    k_chunks = (m + chunk - 1) // chunk
    t = cuda.blockIdx.x
    k = t % k_chunks
    lo = k * chunk
    return t // (channels * k_chunks), (t // k_chunks) % channels, lo, _min(lo + chunk, m)


@cuda.jit(device=True)
def _row_block(x, rows_per_chunk, lanes):
    """(p, r0, r1, first column, span, group) of this block of an (R, W) view."""
    n_rows, width = x.shape
    span = _min(width, lanes)
    tiles = (width + span - 1) // span
    b = cuda.blockIdx.x
    p = b // tiles
    r0 = p * rows_per_chunk
    group = _max(1, lanes // width)
    return p, r0, _min(r0 + rows_per_chunk, n_rows), (b % tiles) * span, span, group


@cuda.jit(device=True)
def _fold_group(sh, lane, span, group):
    """Sum of the ``group`` lanes that share the column of ``lane`` (< span)."""
    s = 0.0
    for q in range(group):
        s += sh[lane + q * span]
    return s


@cuda.jit(device=True)
def _tree_chan(shn, shm, shq, lanes):
    """Merge the (count, mean, M2) states of ``lanes`` lanes into lane 0, in a
    fixed order."""
    h = lanes // 2
    while h > 0:
        cuda.syncthreads()
        for lane in range(cuda.threadIdx.x, h, cuda.blockDim.x):
            shn[lane], shm[lane], shq[lane] = _chan(shn[lane], shm[lane], shq[lane],
                                                    shn[lane + h], shm[lane + h], shq[lane + h])
        h //= 2
    cuda.syncthreads()


@cuda.jit
def plane_moments(x, chunk, lanes, means, m2s):
    """(mean, M2) of each chunk of ``x`` (N, C, M) into ``means[c, n*K + k]``.

    Each lane takes two passes over its elements (mean, then squared
    deviations, read again from cache); lane states are merged by a tree."""
    shn = cuda.shared.array(MAX_LANES, float64)
    shm = cuda.shared.array(MAX_LANES, float64)
    shq = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    n, c, lo, hi = _plane_block(x, chunk)
    for lane in range(tid, lanes, tpb):
        count = _max(0, (hi - lo - lane + lanes - 1) // lanes)
        acc = 0.0
        for i in range(lo + lane, hi, lanes):
            acc += float64(x[n, c, i])
        mean = acc / count if count > 0 else 0.0
        acc = 0.0
        for i in range(lo + lane, hi, lanes):
            d = float64(x[n, c, i]) - mean
            acc += d * d
        shn[lane], shm[lane], shq[lane] = count, mean, acc
    _tree_chan(shn, shm, shq, lanes)
    if tid == 0:
        s = n * ((x.shape[2] + chunk - 1) // chunk) + lo // chunk
        means[c, s] = shm[0]
        m2s[c, s] = shq[0]


@cuda.jit
def row_moments(x, rows_per_chunk, inner, lanes, means, m2s):
    """(mean, M2) of each column of each chunk of rows of ``x`` (R, W) into
    ``means[c, p*inner + i]`` for column ``c*inner + i``."""
    shn = cuda.shared.array(MAX_LANES, float64)
    shm = cuda.shared.array(MAX_LANES, float64)
    shq = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    width = x.shape[1]
    p, r0, r1, col0, span, group = _row_block(x, rows_per_chunk, lanes)
    for lane in range(tid, lanes, tpb):
        col = col0 + lane % span
        off = lane // span
        count, mean, acc = 0, 0.0, 0.0
        if col < width and off < group:
            count = _max(0, (r1 - r0 - off + group - 1) // group)
            for r in range(r0 + off, r1, group):
                acc += float64(x[r, col])
            mean = acc / count if count > 0 else 0.0
            acc = 0.0
            for r in range(r0 + off, r1, group):
                d = float64(x[r, col]) - mean
                acc += d * d
        shn[lane], shm[lane], shq[lane] = count, mean, acc
    cuda.syncthreads()
    for lane in range(tid, span, tpb):
        col = col0 + lane
        if col < width:
            n, mean, m2 = 0.0, 0.0, 0.0
            for q in range(group):
                j = lane + q * span
                n, mean, m2 = _chan(n, mean, m2, shn[j], shm[j], shq[j])
            s = p * inner + col % inner
            means[col // inner, s] = mean
            m2s[col // inner, s] = m2


@cuda.jit
def merge_moments(means, m2s, stride, size, total, lanes, mean_out, var_out):
    """Merge the partial states of channel ``blockIdx.x`` in a fixed order.

    State ``s`` counts ``min(size, total - j * size)`` elements, where
    ``j = (s // stride) % ceil(total / size)``. Writes the mean and the biased
    variance.
    """
    shn = cuda.shared.array(MAX_LANES, float64)
    shm = cuda.shared.array(MAX_LANES, float64)
    shq = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    c = cuda.blockIdx.x
    n_states = means.shape[1]
    blocks = (total + size - 1) // size
    for lane in range(tid, lanes, tpb):
        n, mean, m2 = 0.0, 0.0, 0.0
        for s in range(lane, n_states, lanes):
            count = float64(_min(size, total - ((s // stride) % blocks) * size))
            n, mean, m2 = _chan(n, mean, m2, count, means[c, s], m2s[c, s])
        shn[lane], shm[lane], shq[lane] = n, mean, m2
    _tree_chan(shn, shm, shq, lanes)
    if tid == 0:
        mean_out[c] = shm[0]
        var_out[c] = shq[0] / shn[0]


@cuda.jit
def plane_grad_sums(x, dy, mask, masked, mean, chunk, lanes, s_dy, s_dyx):
    """Sums of ``g`` and ``g * (x - mean[c])`` per chunk of (N, C, M), ``g``
    being ``dy``, or 0 where ``mask > 0`` is false if ``masked``."""
    sa = cuda.shared.array(MAX_LANES, float64)
    sb = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    n, c, lo, hi = _plane_block(x, chunk)
    mu = float64(mean[c])
    for lane in range(tid, lanes, tpb):
        a, b = 0.0, 0.0
        for i in range(lo + lane, hi, lanes):
            g = float64(dy[n, c, i])
            if masked and not mask[n, c, i] > 0:
                g = 0.0
            a += g
            b += g * (float64(x[n, c, i]) - mu)
        sa[lane], sb[lane] = a, b
    _tree_sum2(sa, sb, lanes)
    if tid == 0:
        s = n * ((x.shape[2] + chunk - 1) // chunk) + lo // chunk
        s_dy[c, s] = sa[0]
        s_dyx[c, s] = sb[0]


@cuda.jit
def row_grad_sums(x, dy, mask, masked, mean, rows_per_chunk, inner, lanes, s_dy, s_dyx):
    """Sums of ``g`` and ``g * (x - mean)`` per column and chunk of rows, ``g``
    as in :func:`plane_grad_sums`."""
    sa = cuda.shared.array(MAX_LANES, float64)
    sb = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    width = x.shape[1]
    p, r0, r1, col0, span, group = _row_block(x, rows_per_chunk, lanes)
    for lane in range(tid, lanes, tpb):
        col = col0 + lane % span
        off = lane // span
        a, b = 0.0, 0.0
        if col < width and off < group:
            mu = float64(mean[col // inner])
            for r in range(r0 + off, r1, group):
                g = float64(dy[r, col])
                if masked and not mask[r, col] > 0:
                    g = 0.0
                a += g
                b += g * (float64(x[r, col]) - mu)
        sa[lane], sb[lane] = a, b
    cuda.syncthreads()
    for lane in range(tid, span, tpb):
        col = col0 + lane
        if col < width:
            s = p * inner + col % inner
            s_dy[col // inner, s] = _fold_group(sa, lane, span, group)
            s_dyx[col // inner, s] = _fold_group(sb, lane, span, group)


@cuda.jit
def merge_sums(a, b, lanes, a_out, b_out):
    """Sum the partial sums ``a[c, :]`` and ``b[c, :]`` of channel ``blockIdx.x``."""
    sa = cuda.shared.array(MAX_LANES, float64)
    sb = cuda.shared.array(MAX_LANES, float64)
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    c = cuda.blockIdx.x
    for lane in range(tid, lanes, tpb):
        u, v = 0.0, 0.0
        for s in range(lane, a.shape[1], lanes):
            u += a[c, s]
            v += b[c, s]
        sa[lane], sb[lane] = u, v
    _tree_sum2(sa, sb, lanes)
    if tid == 0:
        a_out[c] = sa[0]
        b_out[c] = sb[0]


@cuda.jit
def plane_affine(x, mean, scale, shift, chunk, relu, mask, masked, out):
    """``out = (x - mean[c]) * scale[c] + shift[c]`` for ``x`` (N, C, M); then
    ``max(out, 0)`` if ``relu``, and 0 where ``mask > 0`` is false if ``masked``."""
    n, c, lo, hi = _plane_block(x, chunk)
    mu, a, b = float64(mean[c]), float64(scale[c]), float64(shift[c])
    for i in range(lo + cuda.threadIdx.x, hi, cuda.blockDim.x):
        out[n, c, i] = _output((float64(x[n, c, i]) - mu) * a + b, relu,
                               masked and not mask[n, c, i] > 0)


@cuda.jit
def row_affine(x, mean, scale, shift, rows_per_chunk, inner, lanes, relu, mask, masked, out):
    """``out = (x - mean) * scale + shift`` per column of ``x`` (R, W); ``relu``,
    ``mask`` and ``masked`` as in :func:`plane_affine`."""
    width = x.shape[1]
    p, r0, r1, col0, span, group = _row_block(x, rows_per_chunk, lanes)
    for lane in range(cuda.threadIdx.x, lanes, cuda.blockDim.x):
        col = col0 + lane % span
        off = lane // span
        if col < width and off < group:
            c = col // inner
            mu, a, b = float64(mean[c]), float64(scale[c]), float64(shift[c])
            for r in range(r0 + off, r1, group):
                out[r, col] = _output((float64(x[r, col]) - mu) * a + b, relu,
                                      masked and not mask[r, col] > 0)


@cuda.jit
def plane_grad_input(dy, x, mask, masked, a, b, c, mean, chunk, out):
    """``out = g * a + (x - mean) * b + c`` per channel for (N, C, M) arrays,
    ``g`` as in :func:`plane_grad_sums`."""
    n, ch, lo, hi = _plane_block(x, chunk)
    ka, kb, kc, mu = float64(a[ch]), float64(b[ch]), float64(c[ch]), float64(mean[ch])
    for i in range(lo + cuda.threadIdx.x, hi, cuda.blockDim.x):
        g = float64(dy[n, ch, i])
        if masked and not mask[n, ch, i] > 0:
            g = 0.0
        out[n, ch, i] = g * ka + (float64(x[n, ch, i]) - mu) * kb + kc


@cuda.jit
def row_grad_input(dy, x, mask, masked, a, b, c, mean, rows_per_chunk, inner, lanes, out):
    """``out = g * a + (x - mean) * b + c`` per column of (R, W) arrays, ``g``
    as in :func:`plane_grad_sums`."""
    width = x.shape[1]
    p, r0, r1, col0, span, group = _row_block(x, rows_per_chunk, lanes)
    for lane in range(cuda.threadIdx.x, lanes, cuda.blockDim.x):
        col = col0 + lane % span
        off = lane // span
        if col < width and off < group:
            ch = col // inner
            ka, kb, kc, mu = float64(a[ch]), float64(b[ch]), float64(c[ch]), float64(mean[ch])
            for r in range(r0 + off, r1, group):
                g = float64(dy[r, col])
                if masked and not mask[r, col] > 0:
                    g = 0.0
                out[r, col] = g * ka + (float64(x[r, col]) - mu) * kb + kc
