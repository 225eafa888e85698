"""Synchronized batch normalization: one batch split across MPI processes.

:class:`Collective` is the statistics part of the :class:`~nbbn.BatchNorm`
template that spans the ranks of a communicator (``comm=``): each rank
reduces its own slice with its backend; one ``Allgather`` of ``O(C)``
float64 values per forward and one per backward (per ghost group) combine
the ranks, staged through the host. Every rank merges the gathered states in
rank order with the same code, so the global statistics, and everything
computed from them, are bitwise equal on every rank. mpi4py is imported only
when a :class:`SyncBatchNorm` is built without a ``comm`` (``import nbbn``
never imports it).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from ._engine import merge_moments
from ._validation import grad_dtype
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


class Collective:
    """Training statistics over every rank of ``comm`` (see the module docstring).

    A rank whose input, ``out`` or ``dy`` is invalid still takes part in the
    collective and raises its error; the other ranks raise a RuntimeError
    naming it. Nothing is changed on any rank then.
    """

    def __init__(self, comm):
        missing = [m for m in ("Allgather", "Get_rank", "Get_size")
                   if not callable(getattr(comm, m, None))]
        if missing:
            raise TypeError(f"comm must be an mpi4py communicator (with Allgather, Get_rank and "
                            f"Get_size), got {type(comm).__name__} without {', '.join(missing)}")
        self.comm = comm

    def _gather(self, send, error, where):
        """The one collective: every rank's ``send`` row, in rank order.

        ``send[0]`` is 1 on a rank whose local step succeeded; ``error`` (or
        None) is its exception, raised after the collective.
        """
        size = self.comm.Get_size()
        rows = np.empty((size, send.size))
        self.comm.Allgather(send, rows)
        if error is not None:
            raise error
        failed = np.flatnonzero(rows[:, 0] != 1.0)
        if failed.size:
            raise RuntimeError(f"the synchronized {where} failed on rank(s) {failed.tolist()} "
                               f"of {size} (see the error there); nothing was changed")
        return rows

    def moments(self, backend, x, axis, channels, first):
        """Global ``(mean, var, count)`` of this rank's group ``x`` (None if
        the rank failed) and the others', on the backend. ``first`` (the first
        group of a forward): ``(error, groups, values per channel of the last
        group)``; every rank checks then that all have as many groups, and
        every group more than one value per channel, before anything changes."""
        error, groups, last = first if first is not None else (None, 0, 0)
        send = np.zeros(4 + 2 * channels)
        try:
            if error is not None:
                raise error
            if x.size:
                mean, var = backend.moments(x, axis)
                count = x.size // channels
                send[4:4 + channels] = backend.host(mean)
                send[4 + channels:] = backend.host(var) * count
                send[1] = count
            send[2], send[3] = groups, last
            send[0] = 1.0
        except Exception as err:  # noqa: BLE001 - raised after the collective
            error = err
        rows = self._gather(send, error, "forward")
        counts = rows[:, 1].copy()
        count = counts.sum()  # exact: integers
        if first is not None:
            if np.any(rows[:, 2] != rows[0, 2]):
                raise ValueError(f"every rank must have as many ghost groups; got "
                                 f"{rows[:, 2].astype(int).tolist()} (virtual_batch_size)")
            smallest = min(count, rows[:, 3].sum())
            if smallest <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got {smallest:.0f} "
                    f"over {rows.shape[0]} rank(s) in a batch"
                    + ("" if groups == 1 else f" or ghost group of {groups}"))
        mean, m2 = merge_moments(counts, np.ascontiguousarray(rows[:, 4:4 + channels]),
                                 np.ascontiguousarray(rows[:, 4 + channels:]))
        return backend.put(mean), backend.put(m2 / count), float(count)

    def backward(self, backend, dy, x, axis, mask, group, out, error):
        """This rank's input gradient into ``out``, through the global
        statistics; returns this rank's ``(dweight, dbias)``."""
        channels = group.mean.shape[0]
        send = np.zeros(1 + 2 * channels)
        local = None
        try:
            if error is not None:
                raise error
            if x.size:
                local = backend.grad_sums(dy, x, axis, mask, group.mean)
                send[1:1 + channels] = backend.host(local[0])
                send[1 + channels:] = backend.host(local[1])
            send[0] = 1.0
        except Exception as err:  # noqa: BLE001 - raised after the collective
            error = err
        rows = self._gather(send, error, "backward")
        total = rows[0, 1:].copy()
        for row in rows[1:]:  # fixed order: the same bits on every rank
            total += row[1:]
        if local is None:
            zeros = backend.put(np.zeros(channels, grad_dtype(x.dtype)))
            return zeros, zeros
        backend.grad_input(dy, x, axis, mask, group.mean, group.invstd, group.weight,
                           backend.put(total[:channels]), backend.put(total[channels:]),
                           group.count, out)
        return backend.gradients(local[0], local[1], group.invstd, grad_dtype(x.dtype))


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
