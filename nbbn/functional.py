"""Stateless batch normalization, with the semantics of
``torch.nn.functional.batch_norm`` and its backward."""
import warnings

import numpy as np

from .gpu import backend as _cuda
from . import _validation as check
from ._engine import (affine, backward_coefficients, coefficients, grad_input, grad_sums,
                      layout_of, moments, update_running)

__all__ = ["batch_norm", "native_batch_norm", "batch_norm_backward"]


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, activation=None):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : ndarray
        float32 or float64 input, (N, C, ...) with ``axis=1`` or (..., C)
        with ``axis=-1``. Never modified. A device array (anything with
        ``__cuda_array_interface__``) runs on the GPU: the output is then a
        Numba device array (see docs/gpu.md).
    running_mean, running_var : ndarray of shape (C,), optional
        Used to normalize when ``training`` is False; updated in place when
        it is True (``(1 - momentum) * running + momentum * batch``, the
        variance unbiased), unless the batch statistics are not finite.
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
    return forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   axis=axis, out=out, activation=activation)[0]


def native_batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
                      eps, *, axis=1, out=None, activation=None):
    """:func:`batch_norm` returning also the statistics it normalized with.

    Returns
    -------
    y : ndarray
    mean, invstd : ndarray of shape (C,), float64
        The mean and ``1 / sqrt(var + eps)`` used: the batch's in training,
        the running ones otherwise. :func:`batch_norm_backward` takes them.
    """
    return forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   axis=axis, out=out, activation=activation)[:3]


def forward(x, running_mean, running_var, weight, bias, training, momentum, eps, *,
            axis=1, out=None, num_features=None, activation=None):
    """:func:`native_batch_norm`, also returning whether the running
    statistics were updated (the layer counts batches by it)."""
    relu = check.activation(activation) is not None
    if _cuda.is_device_array(x):
        return _cuda.forward(x, running_mean, running_var, weight, bias, training, momentum,
                             eps, axis=axis, out=out, num_features=num_features,
                             activation=activation)
    x = check.as_array(x)
    channels = check.check_input(x, check.check_axis(axis), num_features)
    weight = check.channel_vector(weight, "weight", channels)
    bias = check.channel_vector(bias, "bias", channels)
    check.running_stats(running_mean, running_var, channels)
    momentum, eps = check.momentum(momentum), check.eps(eps)
    out = np.empty_like(x) if out is None else check.check_out(out, x)
    layout = layout_of(x.shape, axis)
    updated = False
    if training:
        check.check_batch_size(x, channels)
        mean, var = moments(x, layout)
        if running_mean is not None:
            updated = _update_running(running_mean, running_var, mean, var, layout.count,
                                      momentum)
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    y, invstd = normalize(x, layout, mean, var, weight, bias, eps, out, relu=relu)
    return y, mean, invstd, updated


def normalize(x, layout, mean, var, weight, bias, eps, out, relu=False):
    """Write ``(x - mean) / sqrt(var + eps) * weight + bias`` into ``out``
    (then ``max(out, 0)`` if ``relu``); return ``(out, invstd)``. Inputs
    already validated, statistics float64."""
    invstd, scale, shift = coefficients(mean, var, weight, bias, eps)
    return affine(x, layout, scale, shift, out, relu=relu), invstd


def _update_running(running_mean, running_var, mean, var, count, factor):
    """Update the running statistics unless the batch's are not finite."""
    if not update_running(running_mean, running_var, mean, var * (count / (count - 1)), factor):
        warnings.warn("batch statistics are not finite (NaN or Inf in the input): "
                      "running statistics were not updated", RuntimeWarning, stacklevel=4)
        return False
    return True


def batch_norm_backward(dy, x, mean, invstd, weight=None, training=True, *, axis=1, out=None,
                        y=None, activation=None):
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
        ``sum(g * x_hat)`` and ``sum(g)`` per channel, in the dtype of ``x``,
        where ``g`` is ``dy`` (masked by ``y > 0`` with the ReLU).
    """
    relu = check.activation(activation) is not None
    if _cuda.is_device_array(x) or _cuda.is_device_array(dy):
        return _cuda.backward(dy, x, mean, invstd, weight, training, axis=axis, out=out, y=y,
                              activation=activation)
    x = check.as_array(x)
    channels = check.check_input(x, check.check_axis(axis))
    dy = check.as_array(dy, "dy")
    check.check_like(dy, x, "dy")
    mean = check.channel_vector(mean, "mean", channels)
    invstd = check.channel_vector(invstd, "invstd", channels)
    weight = check.channel_vector(weight, "weight", channels)
    mask = check.saved_output(y, x, relu)
    out = np.empty_like(x) if out is None else check.check_out(out, x)
    layout = layout_of(x.shape, axis)
    s_dy, s_dyx = grad_sums(x, dy, layout, mean, mask=mask)
    dweight = s_dyx * invstd
    if training:
        grad_input(dy, x, layout, *grad_coefficients(s_dy, s_dyx, invstd, weight, layout.count),
                   mean, out, mask=mask)
    else:
        a = invstd if weight is None else weight * invstd
        affine(dy, layout, a, np.zeros_like(a), out, mask=mask)
    return out, dweight.astype(x.dtype), s_dy.astype(x.dtype)


def grad_coefficients(s_dy, s_dyx, invstd, weight, count):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c`` for batch statistics
    over ``count`` values per channel, from the per-channel sums ``s_dy = sum(dy)``
    and ``s_dyx = sum(dy * (x - mean))`` over those values (all float64)."""
    return backward_coefficients(s_dy, s_dyx, invstd, weight, count)
