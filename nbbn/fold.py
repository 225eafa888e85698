"""Fold an evaluation-mode batch normalization into the layer before it."""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _validation as check
from .batchnorm import BatchNorm

__all__ = ["fold_linear", "fold_conv"]


def fold_linear(bn: BatchNorm, weight: ArrayLike, bias: ArrayLike | None = None
                ) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Fold ``bn`` into the Linear layer ``y = x @ weight.T + bias`` before it.

    Parameters
    ----------
    bn : BatchNorm or BatchRenorm
        In evaluation mode, with running statistics, ``num_features`` equal
        to ``weight.shape[0]``. Not modified.
    weight : ndarray of shape (out_features, in_features)
        float16, bfloat16, float32 or float64 Linear weight. Not modified.
    bias : array_like of shape (out_features,), optional
        The Linear bias; None for a layer without one.

    Returns
    -------
    weight, bias : ndarray
        New arrays in the dtype of ``weight`` (computed in float64, rounded
        once) such that, in evaluation mode, ``bn(x @ weight.T + bias)`` equals ``x @ weight_new.T + bias_new``
        (up to rounding). ``bias`` is always returned, even when None was given.
        A fused activation (``activation='relu'``) is not folded: apply it to
        the folded layer's output.

    Raises
    ------
    TypeError
        ``bn`` is not a batch normalization layer, or ``weight`` is not float.
    ValueError
        ``bn`` is in training mode or keeps no running statistics, shapes do
        not match, or ``weight`` is not 2-D.

    See Also
    --------
    fold_conv : the same for a convolution.
    """
    return _fold(bn, weight, bias, "Linear", 2)


def fold_conv(bn: BatchNorm, weight: ArrayLike, bias: ArrayLike | None = None
              ) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Fold ``bn`` into the convolution before it (any spatial rank, any groups).

    Parameters
    ----------
    bn : BatchNorm or BatchRenorm
        As for :func:`fold_linear`.
    weight : ndarray of shape (out_channels, in_channels / groups, *kernel)
        float16, bfloat16, float32 or float64 convolution weight, with one
        or more spatial dimensions (``Conv1d``/``Conv2d``/``Conv3d``
        layout). Not modified.
    bias : array_like of shape (out_channels,), optional
        The convolution bias; None for a layer without one.

    Returns
    -------
    weight, bias : ndarray
        New arrays in the dtype of ``weight`` such that, in evaluation mode,
        ``bn(conv(x, weight, bias))`` equals ``conv(x, weight_new, bias_new)``
        (up to rounding), for any stride, padding, dilation and groups; a
        fused activation is not folded (as :func:`fold_linear`).

    Raises
    ------
    TypeError, ValueError
        As :func:`fold_linear`; ValueError also if ``weight`` has fewer than 3
        dimensions.

    Notes
    -----
    Transposed convolutions keep their output channels on axis 1 of the
    weight; they are not handled here.

    See Also
    --------
    fold_linear : the same for a Linear layer.
    """
    return _fold(bn, weight, bias, "Conv", 3)


def _fold(bn, weight, bias, kind, min_ndim):
    """Check the arguments, then scale the weight rows and shift the bias."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be an nbbn BatchNorm or BatchRenorm, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn must be in evaluation mode (call bn.eval()) to be folded: "
                         "training normalizes with batch statistics")
    if bn.running_mean is None:
        raise ValueError("bn keeps no running statistics (track_running_stats=False): it "
                         "normalizes with batch statistics and cannot be folded")
    w = np.asarray(weight)
    if not check.is_float(w.dtype.newbyteorder("=")):
        raise TypeError(f"weight must have dtype {check.DTYPE_NAMES}, got {w.dtype}")
    if kind == "Linear" and w.ndim != 2:
        raise ValueError(f"Linear weight must be 2-D (out_features, in_features), got shape "
                         f"{w.shape}")
    if w.ndim < min_ndim:
        raise ValueError(f"{kind} weight must be (out_channels, in_channels, *kernel) with at "
                         f"least 3 dimensions, got shape {w.shape}")
    channels = bn.num_features
    if w.shape[0] != channels:
        raise ValueError(f"bn has {channels} channels but the {kind} layer has {w.shape[0]} "
                         f"output features (weight shape {w.shape})")
    b = np.zeros(channels) if bias is None else check.channel_vector(bias, "bias", channels)
    state = bn.state_dict()  # NumPy copies, on any device
    invstd = 1.0 / np.sqrt(state["running_var"].astype(np.float64) + bn.eps)
    scale = invstd if bn.gamma is None else state["weight"].astype(np.float64) * invstd
    shift = (b - state["running_mean"].astype(np.float64)) * scale
    if bn.beta is not None:
        shift = shift + state["bias"].astype(np.float64)
    dtype = w.dtype.newbyteorder("=")
    new_weight = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    return new_weight.astype(dtype), shift.astype(dtype)
