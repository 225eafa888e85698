"""Numba CUDA code over per-channel (C,) vectors: the per-channel math (the
normalization's and the backward's coefficients, the running and moving
statistics' updates, Batch Renormalization's corrections), which the kernels
of ``nbbn.gpu.kernels`` call, and small kernels of one thread per channel
(Batch Renormalization's gradient, the gradients from given sums, vector
helpers). The twins of the per-channel code of ``nbbn.kernels``.

Nothing here uses a block's threads together (shared memory, barriers,
atomics): such kernels, and the device functions they call, live in
``nbbn.gpu.kernels``. (Numba's CUDA simulator swaps the ``numba.cuda`` that a
module sees for the whole of a launch only in the launched kernel's own
module.) All arithmetic is float64, values converted as loaded (see
``nbbn.gpu.kernels``).
"""
import math

from numba import cuda, float64


@cuda.jit(device=True)
def _min(a, b):
    # Written out: numba 0.68's built-in CUDA target compiles min/max through
    # an overload that needs a live GPU even for compile_ptx.
    return a if a < b else b


@cuda.jit(device=True)
def _max(a, b):
    return a if a > b else b


@cuda.jit(device=True)
def _clip(v, lo, hi):
    """``v`` clipped to [lo, hi]; NaN stays NaN (as ``numpy.clip``)."""
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@cuda.jit(device=True)
def normalization(mean, var, weight, bias, has_weight, has_bias, eps, c):
    """``(mean, invstd, scale, shift)`` of channel ``c``, float64: ``y = (x -
    mean) * scale + shift`` with ``invstd = 1 / sqrt(var + eps)``, ``scale =
    weight * invstd`` (or ``invstd``) and ``shift = bias`` (or 0)."""
    inv = 1.0 / math.sqrt(float64(var[c]) + eps)
    scale = float64(weight[c]) * inv if has_weight else inv
    return float64(mean[c]), inv, scale, float64(bias[c]) if has_bias else 0.0


@cuda.jit(device=True)
def input_gradient(sums, invstd, weight, has_weight, count, training, c):
    """``(a, b, c)`` of channel ``c``: ``dx = g * a + (x - mean) * b + c``
    from the gradient sums ``sums[0] = sum(g)``, ``sums[1] = sum(g * (x -
    mean))`` over ``count`` values; ``b = c = 0`` for fixed statistics."""
    inv = float64(invstd[c])
    k = float64(weight[c]) * inv if has_weight else inv
    if not training:
        return k, 0.0, 0.0
    return k, -k * inv * (sums[1, c] * inv) / count, -k * sums[0, c] / count


@cuda.jit(device=True)
def running(running_mean, running_var, mean, var, correction, factor, c):
    """Channel ``c``'s running mean and variance moved towards ``mean`` and
    ``var * correction`` by ``factor``."""
    return ((1.0 - factor) * float64(running_mean[c]) + factor * mean[c],
            (1.0 - factor) * float64(running_var[c]) + factor * (var[c] * correction))


@cuda.jit(device=True)
def renorm_corrections(mean, var, running_mean, running_var, weight, bias, has_affine, has_bias,
                       eps, rmin, rmax, dmax, c):
    """Batch Renormalization's ``(r, d, w, shift)`` of channel ``c``: ``r =
    clip(sigma_B / sigma, rmin, rmax)``, ``d = clip((mean - mu) / sigma,
    -dmax, dmax)`` from the moving ``mu`` and ``sigma = sqrt(running_var +
    eps)``, the backward's weight ``w`` (``weight * r``, or ``r``) and the
    forward's shift (``bias + weight * d``, or ``d``): normalizing with weight
    ``w`` and bias ``shift`` gives ``weight * (x_hat * r + d) + bias``."""
    sigma = math.sqrt(float64(running_var[c]) + eps)
    r = _clip(math.sqrt(var[c] + eps) / sigma, rmin, rmax)
    d = _clip((mean[c] - float64(running_mean[c])) / sigma, -dmax, dmax)
    gamma = float64(weight[c]) if has_affine else 1.0
    shift = gamma * d
    return r, d, gamma * r if has_affine else r, float64(bias[c]) + shift if has_bias else shift


@cuda.jit(device=True)
def renorm_moving(running_mean, running_var, mean, var, eps, factor, c):
    """Channel ``c``'s moving statistics after a batch: ``mu += factor * (mean
    - mu)``, ``sigma += factor * (sigma_B - sigma)``, and ``running_var =
    max(sigma**2 - eps, 0)``."""
    mu = float64(running_mean[c])
    sigma = math.sqrt(float64(running_var[c]) + eps)
    sigma = sigma + factor * (math.sqrt(var[c] + eps) - sigma)
    return mu + factor * (mean[c] - mu), _max(sigma * sigma - eps, 0.0)


@cuda.jit
def renorm_grads(r, d, dweight, dbias, out):
    """``out = r * dweight + d * dbias`` per channel: gamma's gradient through
    the renormalized ``x_hat``."""
    c = cuda.grid(1)
    if c < r.shape[0]:
        out[c] = r[c] * float64(dweight[c]) + d[c] * float64(dbias[c])


@cuda.jit
def invstd(var, eps, out):
    """``out = 1 / sqrt(var + eps)`` per channel."""
    c = cuda.grid(1)
    if c < var.shape[0]:
        out[c] = 1.0 / math.sqrt(float64(var[c]) + eps)


@cuda.jit
def gradients(s_dy, s_dyx, invstd, out):
    """The parameters' gradients from the gradient sums: ``out[0] = s_dyx *
    invstd`` (gamma's), ``out[1] = s_dy`` (beta's), in ``out``'s dtype."""
    c = cuda.grid(1)
    if c < invstd.shape[0]:
        out[0, c] = float64(s_dyx[c]) * float64(invstd[c])
        out[1, c] = s_dy[c]


@cuda.jit
def accumulate(src, acc, first):
    """``acc[i] += src[i]`` (``acc[i] = src[i]`` if ``first``) for 1-D arrays,
    ``acc`` float64."""
    i = cuda.grid(1)
    if i < src.shape[0]:
        acc[i] = float64(src[i]) if first else acc[i] + float64(src[i])


@cuda.jit
def cast(src, dst):
    """``dst[i] = src[i]`` for 1-D arrays (dtype conversion on the device)."""
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


@cuda.jit
def copy(src, dst):
    """``dst[:] = src`` for 1-D arrays, a grid-stride loop: one of the
    benchmark's bandwidth yardsticks."""
    start = cuda.grid(1)
    for i in range(start, src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]
