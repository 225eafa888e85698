"""Stateless batch normalization, with the semantics of
``torch.nn.functional.batch_norm`` and its backward. NumPy arrays run on the
CPU; device arrays (``__cuda_array_interface__``) on the GPU backend, which
is imported only then."""
from __future__ import annotations

import numpy as np

from . import _validation as check
from ._types import Activation, Array, ArrayIn, ArrayOut, Axis
from ._cpu import BACKEND as CPU

__all__ = ["batch_norm", "native_batch_norm", "batch_norm_backward"]


def backend_of(*arrays):
    """The backend of the arrays: the GPU's if any is a device array."""
    if any(check.is_device_array(a) for a in arrays):
        from .gpu.backend import BACKEND as GPU
        return GPU
    return CPU


def batch_norm(x: ArrayIn, running_mean: ArrayOut | None = None,
               running_var: ArrayOut | None = None, weight: ArrayIn | None = None,
               bias: ArrayIn | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: Axis = 1, out: ArrayOut | None = None,
               activation: Activation = None) -> Array:
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : ndarray
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64
        input, (N, C, ...) with ``axis=1`` or (..., C) with ``axis=-1``;
        half inputs have float64 statistics, each output within 1 ulp
        of the float64 result rounded once (docs/mixed-precision.md).
        Never modified. A device array (anything with
        ``__cuda_array_interface__``) runs on the GPU: the output is then a
        Numba device array (see docs/gpu.md).
    running_mean, running_var : ndarray of shape (C,), optional
        Used to normalize when ``training`` is False; updated in place when
        it is True (``(1 - momentum) * running + momentum * batch``, the
        variance unbiased), unless the batch statistics are not finite (a
        ``RuntimeWarning`` says so; for device arrays, at
        ``nbbn.gpu.sync()``: docs/gpu.md).
    weight, bias : array_like of shape (C,), optional
        gamma and beta.
    training : bool
        Normalize with the batch statistics (True) or the running ones.
    momentum : float
        Weight of the batch statistics in the running update.
    eps : float
        Added to the variance.
    axis : {1, -1}
        The channel axis.
    out : ndarray, optional
        C-contiguous array of the shape and dtype of ``x`` to write into.
    activation : {None, 'relu'}
        Apply ``max(y, 0)`` to the output in the same pass over memory
        (docs/activation.md); :func:`batch_norm_backward` then takes the
        output as ``y``.

    Returns
    -------
    ndarray
        The normalized input, in the dtype of ``x``.
    """
    return _forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                    out, activation, False)[0]


def native_batch_norm(x: ArrayIn, running_mean: ArrayOut | None,
                      running_var: ArrayOut | None, weight: ArrayIn | None,
                      bias: ArrayIn | None, training: bool, momentum: float, eps: float, *,
                      axis: Axis = 1, out: ArrayOut | None = None,
                      activation: Activation = None) -> tuple[Array, Array, Array]:
    """:func:`batch_norm` returning also the statistics it normalized with.

    Returns
    -------
    y : ndarray
    mean, invstd : ndarray of shape (C,), float64
        The mean and ``1 / sqrt(var + eps)`` used: the batch's in training,
        the running ones otherwise. :func:`batch_norm_backward` takes them.
    """
    return _forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                    out, activation, True)


def _forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
             activation, want_mean):
    """``(y, mean, invstd)``, the arguments checked; in evaluation ``mean``
    is the running mean as float64 if ``want_mean``, else None."""
    relu = check.activation(activation) is not None
    backend = CPU if type(x) is np.ndarray else backend_of(x)
    x = backend.input(x)
    if x.ndim == 1 and x.size == 0:  # torch's degenerate case: nothing to do or check
        return backend.output(out, x), backend.full(0, np.nan, np.float64), \
            backend.full(0, np.nan, np.float64)
    channels = check.check_input(backend.meta(x), check.check_axis(axis))
    weight = backend.vector(weight, "weight", channels)
    bias = backend.vector(bias, "bias", channels)
    backend.running_stats(running_mean, running_var, channels)
    momentum, eps = check.momentum(momentum), check.eps(eps)
    if training:
        check.check_batch_size(backend.meta(x), channels)
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    out = backend.output(out, x)
    if not x.size:  # no samples: nothing to normalize, the statistics are undefined
        undefined = backend.full(channels, np.nan, np.float64)
        return out, undefined, undefined
    if not training:
        mean, invstd = backend.evaluate(x, axis, running_mean, running_var, weight, bias, eps,
                                        relu, out, want_mean)
        return out, mean if want_mean else None, invstd
    mean, invstd, updated = backend.train(x, axis, running_mean, running_var, momentum, weight,
                                          bias, eps, relu, out)
    if running_mean is not None and updated is not None and not updated:
        check.warn_not_finite(3)
    return out, mean, invstd


def batch_norm_backward(dy: ArrayIn, x: ArrayIn, mean: ArrayIn, invstd: ArrayIn,
                        weight: ArrayIn | None = None, training: bool = True, *,
                        axis: Axis = 1, out: ArrayOut | None = None, y: ArrayIn | None = None,
                        activation: Activation = None) -> tuple[Array, Array, Array]:
    """Gradients of :func:`batch_norm` given the gradient ``dy`` of its output.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the output; shape and dtype of ``x``.
    x : ndarray
        The input of the forward pass.
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with (see :func:`native_batch_norm`).
    weight : array_like of shape (C,), optional
        gamma, if the forward had one.
    training : bool
        True if ``mean`` and ``invstd`` were the batch's own statistics: the
        gradient then flows through them. False for fixed (running) statistics.
    axis : {1, -1}
        The channel axis.
    out : ndarray, optional
        Where to write the input gradient.
    y : ndarray, optional
        The forward's output, required with ``activation='relu'``: the
        gradient flows where ``y > 0`` (no mask is stored in between).
    activation : {None, 'relu'}
        The activation the forward fused; ``dy`` is then the gradient of
        the activation's output.

    Returns
    -------
    dx : ndarray
        Gradient with respect to ``x``.
    dweight, dbias : ndarray of shape (C,)
        ``sum(g * x_hat)`` and ``sum(g)`` per channel, in the dtype of ``x``
        (float32 for a half ``x``, as torch's float32 parameters get),
        where ``g`` is ``dy`` (masked by ``y > 0`` with the ReLU).
    """
    relu = check.activation(activation) is not None
    backend = CPU if type(x) is np.ndarray and type(dy) is np.ndarray else backend_of(x, dy)
    x = backend.input(x)  # (the checked array; mypy keeps its declared type: the ignores)
    if x.ndim == 1 and x.size == 0:  # type: ignore[union-attr]  # torch's degenerate case
        dy = backend.like(dy, x, "dy")
        zeros = backend.full(0, 0.0, check.grad_dtype(x.dtype))  # type: ignore[union-attr]
        return backend.output(out, x), zeros, zeros
    channels = check.check_input(backend.meta(x), check.check_axis(axis))
    dy = backend.like(dy, x, "dy")
    mean = backend.stats(mean, "mean", channels)
    invstd = backend.stats(invstd, "invstd", channels)
    weight = backend.vector(weight, "weight", channels)
    mask = check.saved_output(y, x, relu, backend.like)
    out = backend.output(out, x)
    if not x.size:  # type: ignore[union-attr]  # no samples: no gradient
        zeros = backend.full(channels, 0.0, check.grad_dtype(x.dtype))  # type: ignore[union-attr]
        return out, zeros, zeros
    dweight, dbias = backend.backward(dy, x, axis, mask, mean, invstd, weight, bool(training),
                                      out)
    return out, dweight, dbias
