"""Synchronized batch normalization: one batch split across MPI processes,
the layer whose statistics part is :class:`nbbn.parts.Collective`. mpi4py
is imported only when a :class:`SyncBatchNorm` is built without a ``comm``
(``import nbbn`` never imports it).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from .batchnorm import BatchNorm
from ._types import Activation, Axis, Comm, Device

__all__ = ["SyncBatchNorm"]


def _comm_world():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(
            "SyncBatchNorm needs mpi4py and an MPI library; install them with "
            "pip install 'nbbn[mpi]' (or pass comm=)") from err
    return MPI.COMM_WORLD


class SyncBatchNorm(BatchNorm):
    """:class:`BatchNorm` whose training statistics span all ranks of an MPI
    communicator, as ``torch.nn.SyncBatchNorm``.

    In training, the batch is the concatenation of every rank's input along
    the sample axes: each rank passes its own slice (slices may differ in
    size, and may be empty) and gets back the normalization of that slice
    with the statistics of the whole batch. Every rank must call
    :meth:`forward` and :meth:`backward` the same number of times, in the
    same order, with inputs of the same number of channels. With
    ``virtual_batch_size=k``, the g-th group of ``k`` samples of every rank
    together make the g-th ghost batch (as Keras's synchronized ghost
    batches); every rank must then have as many groups.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, bias, axis, dtype, param_dtype, activation, virtual_batch_size, device
        As :class:`BatchNorm`.
    comm : mpi4py.MPI.Comm, optional
        The ranks that share a batch; default ``MPI.COMM_WORLD`` (importing
        mpi4py then). Any object with ``Allgather``, ``Get_rank`` and
        ``Get_size`` of mpi4py's buffer interface will do.

    Notes
    -----
    Communication: exactly one collective (``comm.Allgather``) per training
    :meth:`forward` (per ghost group), of ``4 + 2C`` float64 values per rank
    (an ok flag, the local count, two checks, per-channel mean and M2), and
    exactly one per training :meth:`backward` (per group), of ``1 + 2C``
    values (an ok flag, per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``).
    Evaluation mode is plain :class:`BatchNorm` and communicates nothing. On
    the GPU the per-channel values are staged through the host.

    Results: ranks merge the gathered states in rank order (Chan's formula
    for the moments, a sum for the gradient sums), so outputs are those of
    :class:`BatchNorm` on the whole batch up to rounding, and the statistics,
    running statistics and ``num_batches_tracked`` are bitwise equal on every
    rank. If the batch statistics are not finite (NaN or Inf on any rank),
    every rank skips the running update with a RuntimeWarning.

    Gradients: :meth:`backward` returns the gradient of this rank's slice,
    exact for the global batch. ``grad_gamma`` and ``grad_beta`` are this
    rank's contributions, as in torch: reduce them with the other
    parameters' gradients (sum, or average under a per-rank mean loss); their
    sum over ranks is the gradient of single-process :class:`BatchNorm`.

    Errors: a rank whose input, ``out`` or ``dy`` is invalid still takes part
    in the collective and raises its error; the other ranks raise a
    RuntimeError naming it. A global batch with at most one value per
    channel raises ValueError on every rank. Nothing is changed in any case.
    """

    _show_comm = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
                 axis: Axis = 1, dtype: DTypeLike = np.float32,
                 param_dtype: DTypeLike | None = None, activation: Activation = None,
                 virtual_batch_size: int | None = None, comm: Comm | None = None,
                 device: Device = "cpu") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias,
                         axis=axis, dtype=dtype, param_dtype=param_dtype, activation=activation,
                         virtual_batch_size=virtual_batch_size,
                         comm=_comm_world() if comm is None else comm, device=device)

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm, comm: Comm | None = None) -> SyncBatchNorm:
        """A SyncBatchNorm with the settings, parameters, running statistics,
        device and mode of ``bn`` (copied).

        Parameters
        ----------
        bn : BatchNorm
            The layer to convert (a :class:`~nbbn.BatchRenorm` synchronizes
            with its own ``comm=`` argument instead).
        comm : mpi4py.MPI.Comm, optional
            As in the constructor.

        Returns
        -------
        SyncBatchNorm
        """
        if type(bn) not in (BatchNorm, SyncBatchNorm):
            raise TypeError(f"bn must be a BatchNorm, got {type(bn).__name__} (a BatchRenorm "
                            "is synchronized by its own comm= argument)")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  bias=bn.bias, axis=bn.axis, dtype=bn.dtype, param_dtype=bn.param_dtype,
                  activation=bn.activation,
                  virtual_batch_size=bn.virtual_batch_size, comm=comm, device=bn.device)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)
