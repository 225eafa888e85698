"""Numba CUDA kernels over per-channel (C,) vectors: the normalization's
coefficients, the running (moving) statistics' updates, the backward's
coefficients, Batch Renormalization's corrections, and small vector helpers.
The twins of the per-channel kernels of ``nbbn.kernels``; the passes over the
data are in ``nbbn.gpu.kernels``. One thread per channel, except the running
updates: one block, so that a non-finite channel can veto every update.
All arithmetic is float64, values converted as loaded (see ``nbbn.gpu.kernels``).
"""
import math

from numba import cuda, float64, int32

from .kernels import MAX_LANES, _max, _min


@cuda.jit(device=True)
def _clip(v, lo, hi):
    """``v`` clipped to [lo, hi]; NaN stays NaN (as ``numpy.clip``)."""
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@cuda.jit
def coefficients(mean, var, weight, bias, has_weight, has_bias, eps,
                 mean_out, invstd, scale, shift):
    """Per channel: float64 mean, ``1 / sqrt(var + eps)``, ``weight * invstd``
    and the shift (``bias``, or 0)."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        inv = 1.0 / math.sqrt(float64(var[c]) + eps)
        mean_out[c] = mean[c]
        invstd[c] = inv
        scale[c] = float64(weight[c]) * inv if has_weight else inv
        shift[c] = float64(bias[c]) if has_bias else 0.0


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


@cuda.jit
def update_running(running_mean, running_var, mean, var, correction, factor, lanes, ok):
    """One block: if every ``mean`` and ``var`` is finite, move the running
    statistics towards them (the variance times ``correction``), in place.
    ``ok[0]`` says whether they were updated."""
    good = _all_finite(mean, var, lanes)
    if good == 1:
        for c in range(cuda.threadIdx.x, mean.shape[0], cuda.blockDim.x):
            running_mean[c] = (1.0 - factor) * float64(running_mean[c]) + factor * mean[c]
            running_var[c] = ((1.0 - factor) * float64(running_var[c])
                              + factor * (var[c] * correction))
    if cuda.threadIdx.x == 0:
        ok[0] = good


@cuda.jit
def renorm_coefficients(mean, var, running_mean, running_var, weight, bias, has_affine, eps,
                        rmin, rmax, dmax, invstd, r, d, w, scale, shift):
    """Per channel, Batch Renormalization's ``r = clip(sigma_B / sigma, rmin,
    rmax)`` and ``d = clip((mean - mu) / sigma, -dmax, dmax)`` from the moving
    ``mu`` and ``sigma = sqrt(running_var + eps)``; the backward's weight ``w``
    (``weight * r``, or ``r``) and the forward's ``scale`` and ``shift``:
    ``y = (x - mean) * scale + shift``."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        std = math.sqrt(var[c] + eps)
        inv = 1.0 / std
        sigma = math.sqrt(float64(running_var[c]) + eps)
        rc = _clip(std / sigma, rmin, rmax)
        dc = _clip((mean[c] - float64(running_mean[c])) / sigma, -dmax, dmax)
        gamma = float64(weight[c]) if has_affine else 1.0
        invstd[c], r[c], d[c] = inv, rc, dc
        w[c] = gamma * rc if has_affine else rc
        scale[c] = w[c] * inv
        shift[c] = float64(bias[c]) + gamma * dc if has_affine else dc


@cuda.jit
def renorm_update(running_mean, running_var, mean, var, eps, factor, lanes, ok):
    """One block: if every ``mean`` and ``var`` is finite, ``mu += factor *
    (mean - mu)`` and ``sigma += factor * (sigma_B - sigma)`` with ``running_var
    = max(sigma**2 - eps, 0)``, in place. ``ok[0]`` says whether they were."""
    good = _all_finite(mean, var, lanes)
    if good == 1:
        for c in range(cuda.threadIdx.x, mean.shape[0], cuda.blockDim.x):
            mu = float64(running_mean[c])
            sigma = math.sqrt(float64(running_var[c]) + eps)
            sigma = sigma + factor * (math.sqrt(var[c] + eps) - sigma)
            running_mean[c] = mu + factor * (mean[c] - mu)
            running_var[c] = _max(sigma * sigma - eps, 0.0)
    if cuda.threadIdx.x == 0:
        ok[0] = good


@cuda.jit
def backward_coefficients(s_dy, s_dyx, invstd, weight, has_weight, count, training,
                          a, b, c, dweight, dbias):
    """Per channel: ``dx = dy * a + (x - mean) * b + c`` coefficients and the
    parameter gradients (in the dtype of ``dweight``)."""
    ch = cuda.grid(1)
    if ch < invstd.shape[0]:
        inv = float64(invstd[ch])
        dw = s_dyx[ch] * inv
        k = float64(weight[ch]) * inv if has_weight else inv
        a[ch] = k
        if training:
            b[ch] = -k * inv * dw / count
            c[ch] = -k * s_dy[ch] / count
        else:
            b[ch] = 0.0
            c[ch] = 0.0
        dweight[ch] = dw
        dbias[ch] = s_dy[ch]


@cuda.jit
def renorm_grads(r, d, dweight, dbias, out):
    """``out = r * dweight + d * dbias`` per channel: gamma's gradient through
    the renormalized ``x_hat``."""
    c = cuda.grid(1)
    if c < r.shape[0]:
        out[c] = r[c] * float64(dweight[c]) + d[c] * float64(dbias[c])


@cuda.jit
def accumulate(src, acc):
    """``acc[i] += src[i]`` for 1-D arrays, ``acc`` float64."""
    i = cuda.grid(1)
    if i < src.shape[0]:
        acc[i] += float64(src[i])


@cuda.jit
def cast(src, dst):
    """``dst[i] = src[i]`` for 1-D arrays (dtype conversion on the device)."""
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


@cuda.jit
def copy(src, dst):
    """``dst[:] = src`` for 1-D arrays: the memory-bandwidth yardstick of the
    benchmark."""
    start = cuda.grid(1)
    for i in range(start, src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]
