"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275)."""
import warnings

import numpy as np

from .gpu import backend as _cuda, layers as _cuda_layers
from . import _validation as check
from ._engine import affine, layout_of, moments
from .batchnorm import BatchNorm
from .functional import batch_norm_backward


def renorm_forward(x, running_mean, running_var, weight, bias, rmax, dmax, eps, factor, *,
                   axis=1, out=None, num_features=None):
    """Batch Renormalization's training forward and moving update on the CPU
    (the GPU twin is ``nbbn._cuda_layers.renorm_forward``).

    Returns ``(y, mean, invstd, w, r, d, updated)``: float64 ``mean``,
    ``invstd``, the backward's weight ``w`` (``weight * r``, or ``r``) and the
    corrections ``r`` and ``d``; ``updated`` False if the batch statistics
    were not finite (the moving statistics are then unchanged).
    """
    channels = check.check_input(x, axis, num_features)
    out = np.empty_like(x) if out is None else check.check_out(out, x)
    check.check_batch_size(x, channels)
    layout = layout_of(x.shape, axis)
    mean, var = moments(x, layout)
    std = np.sqrt(var + eps)
    invstd = 1.0 / std
    mu = running_mean.astype(np.float64)
    sigma = np.sqrt(running_var.astype(np.float64) + eps)
    r = np.clip(std / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - mu) / sigma, -dmax, dmax)
    if weight is not None:
        gamma = weight.astype(np.float64)
        w, b = gamma * r, bias.astype(np.float64) + gamma * d
    else:
        w, b = r, d
    scale = w * invstd
    affine(x, layout, scale, b - mean * scale, out)
    updated = bool(np.isfinite(mean).all() and np.isfinite(std).all())
    if updated:
        sigma = sigma + factor * (std - sigma)
        running_mean[...] = mu + factor * (mean - mu)
        running_var[...] = np.maximum(sigma * sigma - eps, 0.0)
    return out, mean, invstd, w, r, d, updated


def renorm_grads(r, d, dweight, dbias, dtype):
    """gamma's and beta's gradients ``(r * dweight + d * dbias, dbias)`` in
    ``dtype``, from those of batch norm with weight ``gamma * r`` (the GPU twin
    is ``nbbn._cuda_layers.renorm_grads``)."""
    return (r * dweight + d * dbias).astype(dtype), dbias.astype(dtype)


class BatchRenorm(BatchNorm):
    """Batch Renormalization: batch normalization corrected toward the moving
    statistics, so that training and inference compute the same function.

    In training, with the batch mean ``mu_B``, the biased batch variance
    ``var_B``, ``sigma_B = sqrt(var_B + eps)`` and the moving statistics
    ``mu`` and ``sigma``::

        r = clip(sigma_B / sigma, 1 / rmax, rmax)
        d = clip((mu_B - mu) / sigma, -dmax, dmax)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    ``r`` and ``d`` are constants in the backward pass. The moving statistics
    are then updated as in the paper: ``mu += momentum * (mu_B - mu)`` and
    ``sigma += momentum * (sigma_B - sigma)``. In evaluation mode
    ``y = gamma * (x - mu) / sigma + beta``.

    With ``rmax=1`` and ``dmax=0`` the training forward and backward are
    exactly those of :class:`~nbbn.BatchNorm` (the paper's warm-up); raise
    ``rmax`` and ``dmax`` as training goes on by assigning the attributes.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    rmax : float
        Largest correction of the scale, >= 1 (``inf`` for no clipping).
    dmax : float
        Largest correction of the shift, in units of ``sigma``, >= 0.
    eps : float
        Added to the batch variance inside ``sigma_B``.
    momentum : float or None
        Update rate of the moving statistics; None for the cumulative average.
    affine : bool
        Learn gamma (``gamma``) and beta (``beta``).
    axis : {1, -1}
        Channel axis: 1 for (N, C, ...) inputs, -1 for channels-last (..., C).
    dtype : {numpy.float32, numpy.float64}
        dtype of the parameters and moving statistics.
    device : {'cpu', 'cuda'}
        Where the parameters live and the layer computes, as for
        :class:`~nbbn.BatchNorm` (docs/gpu.md).

    Attributes
    ----------
    running_mean : ndarray of shape (C,)
        The moving mean ``mu``.
    running_var : ndarray of shape (C,)
        ``sigma**2 - eps``, stored so that ``sqrt(running_var + eps)`` is the
        moving ``sigma``, exactly as torch's ``BatchNorm`` evaluates: a
        :meth:`state_dict` loads into ``torch.nn.BatchNorm2d`` (same ``eps``)
        and gives the same evaluation output.
    running_std : ndarray of shape (C,)
        The moving ``sigma`` (float64, read-only, computed from ``running_var``).
    num_batches_tracked : int
        Number of updates of the moving statistics.

    Notes
    -----
    The moving ``sigma`` follows the paper: an average of ``sqrt(var_B +
    eps)`` with the biased batch variance, where torch's ``BatchNorm``
    averages the unbiased variance. Both start at mean 0, variance 1.
    A batch whose statistics are not finite leaves the moving statistics
    unchanged and emits a ``RuntimeWarning``.
    """

    def __init__(self, num_features, rmax=3.0, dmax=5.0, eps=1e-5, momentum=0.01,
                 affine=True, *, axis=1, dtype=np.float32, device="cpu"):
        rmax = check.renorm_limit(rmax, "rmax", 1.0)
        dmax = check.renorm_limit(dmax, "dmax", 0.0)
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype,
                         device=device)
        self._rmax, self._dmax = rmax, dmax
        self._corrections = None  # (r, d) of the last training forward

    @property
    def rmax(self):
        """Largest scale correction ``r`` (>= 1); may be changed during training."""
        return self._rmax

    @rmax.setter
    def rmax(self, value):
        self._rmax = check.renorm_limit(value, "rmax", 1.0)

    @property
    def dmax(self):
        """Largest shift correction ``|d|`` (>= 0); may be changed during training."""
        return self._dmax

    @dmax.setter
    def dmax(self, value):
        self._dmax = check.renorm_limit(value, "dmax", 0.0)

    @property
    def running_std(self):
        """The moving ``sigma = sqrt(running_var + eps)``, float64 (NumPy on any device)."""
        return np.sqrt(_cuda.to_host(self.running_var).astype(np.float64) + self.eps)

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, rmax={self.rmax}, dmax={self.dmax}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"axis={self.axis}, dtype={self.dtype.name}"
                + (f", device={self.device!r}" if self.device != "cpu" else "") + ")")

    def forward(self, x, out=None):
        """Renormalize ``x`` (training) or normalize it with the moving
        statistics (evaluation); in training also update those.

        Parameters
        ----------
        x : ndarray
            float32 or float64 with ``num_features`` channels on ``axis``.
        out : ndarray, optional
            Where to write the output (shape and dtype of ``x``).

        Returns
        -------
        ndarray
            The output, in the dtype of ``x``.
        """
        if not self.training:
            y = super().forward(x, out=out)
            self._corrections = None
            return y
        x = self._input(x)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / (self.num_batches_tracked + 1)
        run = _cuda_layers.renorm_forward if self.device == "cuda" else renorm_forward
        y, mean, invstd, weight, r, d, updated = run(
            x, self.running_mean, self.running_var, self.gamma, self.beta, self.rmax, self.dmax,
            self.eps, factor, axis=self.axis, out=out, num_features=self.num_features)
        if updated:
            self.num_batches_tracked += 1
        else:
            warnings.warn("batch statistics are not finite (NaN or Inf in the input): "
                          "moving statistics were not updated", RuntimeWarning, stacklevel=2)
        self._corrections = (weight, r, d)
        self._saved = (x, mean, invstd, True, out is not None and _cuda.shares_memory(y, x))
        return y

    _gpu_forward = forward

    def backward(self, dy, out=None):
        """Gradient with respect to the input of the most recent forward,
        ``r`` and ``d`` held constant.

        Sets ``grad_gamma`` (``sum(dy * x_hat)`` with the renormalized
        ``x_hat``) and ``grad_beta`` (None without ``affine``).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the forward's output.
        out : ndarray, optional
            Where to write the input gradient.

        Returns
        -------
        ndarray
            The input gradient.
        """
        if self._saved is None or self._corrections is None:
            return super().backward(dy, out=out)
        x, mean, invstd, _, overwritten = self._saved
        if overwritten:
            raise RuntimeError("the forward's input was overwritten by its out= argument; "
                               "backward needs it")
        weight, r, d = self._corrections
        dx, dw, db = batch_norm_backward(dy, x, mean, invstd, weight, True,
                                         axis=self.axis, out=out)
        if self.affine:
            grads = _cuda_layers.renorm_grads if self.device == "cuda" else renorm_grads
            self.grad_gamma, self.grad_beta = grads(r, d, dw, db, self.dtype)
        return dx
