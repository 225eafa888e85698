"""What the layers need on the GPU beyond ``nbbn.gpu.backend``: the GPU half of
Batch Renormalization's driver pair (the CPU half is in ``nbbn.renorm``), and
helpers that take NumPy or device arrays alike, so that ghost batch
normalization runs one loop over its groups on either device.

Like ``nbbn.gpu.backend``, nothing here imports ``numba.cuda`` until a device array
or ``device='cuda'`` shows up. Launch constants are read from ``nbbn.gpu.backend``
at call time.
"""
import numpy as np

from . import backend as _cuda
from .. import _validation as check


def renorm_forward(x, running_mean, running_var, weight, bias, rmax, dmax, eps, factor, *,
                   axis=1, out=None, num_features=None):
    """The GPU twin of ``nbbn.renorm.renorm_forward``: Batch Renormalization's
    training forward and moving update, on device arrays.

    Returns ``(y, mean, invstd, w, r, d, updated)``: ``y`` a device array like
    ``x``; float64 device vectors ``mean``, ``invstd``, the backward's weight
    ``w`` (``weight * r``, or ``r``) and the corrections ``r`` and ``d``;
    ``updated`` False if the batch statistics were not finite (the moving
    statistics are then unchanged).
    """
    x = _cuda.as_input(x)
    channels = check.check_input(_cuda.meta(x), check.check_axis(axis), num_features)
    out = _cuda._output(out, x)
    check.check_batch_size(_cuda.meta(x), channels)
    plan = _cuda.plan_of(tuple(x.shape), axis)
    mean, var = _cuda.moments(x, plan)
    cu, k, tpb = _cuda.cuda(), _cuda._channels(), _cuda.THREADS_PER_BLOCK
    invstd, r, d, w, scale, shift = (cu.device_array(channels) for _ in range(6))
    has_affine = weight is not None
    k.renorm_coefficients[_cuda._grid(channels), tpb](
        mean, var, running_mean, running_var, weight if has_affine else mean,
        bias if has_affine else mean, has_affine, eps, 1.0 / rmax, rmax, dmax,
        invstd, r, d, w, scale, shift)
    _cuda.affine(x, plan, mean, scale, shift, out)
    ok = cu.device_array(1, np.int32)
    k.renorm_update[1, tpb](running_mean, running_var, mean, var, eps, factor, _cuda.LANES, ok)
    return out, mean, invstd, w, r, d, bool(ok.copy_to_host()[0])


def renorm_grads(r, d, dweight, dbias, dtype):
    """The GPU twin of ``nbbn.renorm.renorm_grads``: ``(r * dweight + d *
    dbias, dbias)`` as device vectors in ``dtype``, gamma's and beta's gradients."""
    channels = r.shape[0]
    grad_gamma = _cuda.cuda().device_array(channels, dtype)
    _cuda._channels().renorm_grads[_cuda._grid(channels), _cuda.THREADS_PER_BLOCK](
        r, d, dweight, dbias, grad_gamma)
    return grad_gamma, _cuda.astype(dbias, dtype)


def output_like(x, out=None):
    """``out`` checked against ``x``, or a new array like ``x``, on the side of
    ``x`` (NumPy or device)."""
    if _cuda.is_device_array(x):
        return _cuda._output(out, x)
    return np.empty_like(x) if out is None else check.check_out(out, x)


def input_like(a, x, name):
    """Input ``a`` (``dy``) checked against ``x`` and put on its side: copied to
    the device if ``x`` is there and ``a`` is a NumPy array."""
    if _cuda.is_device_array(x):
        a = _cuda.as_input(a, name)
        _cuda._check_like(a, x, name)
        return a
    a = check.as_array(a, name)
    check.check_like(a, x, name)
    return a


def channel_sum(vectors, dtype):
    """The sum of per-channel vectors, accumulated in float64 in order and
    returned in ``dtype``: NumPy or device arrays (all on one side)."""
    if not _cuda.is_device_array(vectors[0]):
        total = 0.0
        for v in vectors:
            total = total + v.astype(np.float64)
        return total.astype(dtype)
    channels = vectors[0].shape[0]
    total = _cuda.cuda().to_device(np.zeros(channels))
    for v in vectors:
        _cuda._channels().accumulate[_cuda._grid(channels), _cuda.THREADS_PER_BLOCK](v, total)
    return _cuda.astype(total, dtype)
