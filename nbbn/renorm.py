"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275): the layer whose
correction part is :class:`nbbn.parts.Renorm`."""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import _validation as check
from .batchnorm import BatchNorm
from ._types import Activation, Axis, Comm, Device
from .parts import Renorm

__all__ = ["BatchRenorm"]


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
    Every option of :class:`~nbbn.BatchNorm` combines with it: a fused
    activation, ghost batches (``r`` and ``d`` per group), statistics
    synchronized over MPI (``comm``), the GPU.

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
    bias, axis, dtype, param_dtype, activation, virtual_batch_size, comm, device
        As :class:`~nbbn.BatchNorm`.

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

    _correction: Renorm

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0,
                 eps: float = 1e-5, momentum: float | None = 0.01, affine: bool = True, *,
                 bias: bool = True, axis: Axis = 1, dtype: DTypeLike = np.float32,
                 param_dtype: DTypeLike | None = None, activation: Activation = None,
                 virtual_batch_size: int | None = None, comm: Comm | None = None,
                 device: Device = "cpu") -> None:
        self._correction = Renorm(rmax, dmax)
        super().__init__(num_features, eps, momentum, affine, True, bias=bias, axis=axis,
                         dtype=dtype, param_dtype=param_dtype, activation=activation,
                         virtual_batch_size=virtual_batch_size, comm=comm, device=device)

    @property
    def rmax(self) -> float:
        """Largest scale correction ``r`` (>= 1); may be changed during training."""
        return self._correction.rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._correction.rmax = check.renorm_limit(value, "rmax", 1.0)

    @property
    def dmax(self) -> float:
        """Largest shift correction ``|d|`` (>= 0); may be changed during training."""
        return self._correction.dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        self._correction.dmax = check.renorm_limit(value, "dmax", 0.0)

    @property
    def running_std(self) -> NDArray[np.float64]:
        """The moving ``sigma = sqrt(running_var + eps)``, float64 (NumPy on any device)."""
        return np.sqrt(self._backend.host(self.running_var).astype(np.float64) + self.eps)

    def _settings(self):
        return (f"rmax={self.rmax}, dmax={self.dmax}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")
