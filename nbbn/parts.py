"""The parts that plug into the :class:`~nbbn.BatchNorm` template between its
statistics and its normalization, apart from the layer (this module never
imports it):

* :class:`Collective`, a source of training statistics: all ranks of an MPI
  communicator (``comm=``, :class:`~nbbn.SyncBatchNorm`). Each rank reduces its
  own slice with its backend; one ``Allgather`` of ``O(C)`` float64 values per
  forward and one per backward (per ghost group) combine the ranks, staged
  through the host. Every rank merges the gathered states in rank order with
  the same code, so the global statistics, and everything computed from them,
  are bitwise equal on every rank;
* :class:`Renorm`, a correction: Batch Renormalization's ``r`` and ``d``
  (:class:`~nbbn.BatchRenorm`).
"""
import numpy as np

from . import _validation as check
from ._engine import merge_moments

__all__ = ["Collective", "Renorm"]


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
            zeros = backend.put(np.zeros(channels, check.grad_dtype(x.dtype)))
            return zeros, zeros
        backend.grad_input(dy, x, axis, mask, group.mean, group.invstd, group.weight,
                           backend.put(total[:channels]), backend.put(total[channels:]),
                           group.count, out)
        return backend.gradients(local[0], local[1], group.invstd, check.grad_dtype(x.dtype))


class Renorm:
    """Batch Renormalization's correction: between the batch statistics and
    the normalization, ``r`` and ``d`` from the moving statistics; the moving
    update of the paper; ``r`` and ``d`` constants in the backward."""

    def __init__(self, rmax, dmax):
        self.rmax = check.renorm_limit(rmax, "rmax", 1.0)
        self.dmax = check.renorm_limit(dmax, "dmax", 0.0)

    def correct(self, backend, mean, var, running_mean, running_var, gamma, beta, eps, factor):
        """``(weight, bias, (r, d), updated)``: normalizing with this weight
        and bias gives ``gamma * (x_hat * r + d) + beta``; the moving
        statistics move unless the batch's are not finite."""
        w, b, r, d, updated = backend.renorm(mean, var, running_mean, running_var, gamma, beta,
                                             self.rmax, self.dmax, eps, factor)
        return w, b, (r, d), updated
