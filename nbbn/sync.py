"""Synchronized batch normalization: one batch split across MPI processes.

Each rank reduces its own slice with the CPU engine; one ``Allgather`` of
``O(C)`` float64 values per forward and one per backward combine the ranks.
Every rank merges the gathered states in rank order with the same code, so
the global statistics, and everything computed from them, are bitwise equal
on every rank. mpi4py is imported only when a layer is built without a
``comm`` (``import nbbn`` never imports it).
"""
from typing import NamedTuple

import numpy as np

from . import _validation as check
from ._engine import Layout, grad_input, grad_sums, layout_of, merge_moments, moments
from .batchnorm import BatchNorm
from .functional import _update_running, grad_coefficients, normalize

__all__ = ["SyncBatchNorm"]


def _comm_world():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(
            "SyncBatchNorm needs mpi4py and an MPI library; install them with "
            "pip install 'nbbn[mpi]' (or pass comm=)") from err
    return MPI.COMM_WORLD


def _check_comm(comm):
    missing = [m for m in ("Allgather", "Get_rank", "Get_size") if not callable(getattr(comm, m, None))]
    if missing:
        raise TypeError(f"comm must be an mpi4py communicator (with Allgather, Get_rank and "
                        f"Get_size), got {type(comm).__name__} without {', '.join(missing)}")
    return comm


class _Synced(NamedTuple):
    """What the backward of a synchronized forward needs."""

    x: np.ndarray
    layout: Layout  # None for an empty slice
    mean: np.ndarray  # global, float64
    invstd: np.ndarray  # global, float64
    count: float  # values per channel over all ranks
    overwritten: bool


class SyncBatchNorm(BatchNorm):
    """:class:`BatchNorm` whose training statistics span all ranks of an MPI
    communicator, as ``torch.nn.SyncBatchNorm``.

    In training, the batch is the concatenation of every rank's input along
    the sample axes: each rank passes its own slice (slices may differ in
    size, and may be empty) and gets back the normalization of that slice
    with the statistics of the whole batch. Every rank must call
    :meth:`forward` and :meth:`backward` the same number of times, in the
    same order, with inputs of the same number of channels.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype
        As :class:`BatchNorm`.
    comm : mpi4py.MPI.Comm, optional
        The ranks that share a batch; default ``MPI.COMM_WORLD`` (importing
        mpi4py then). Any object with ``Allgather``, ``Get_rank`` and
        ``Get_size`` of mpi4py's buffer interface will do.

    Notes
    -----
    Communication: exactly one collective (``comm.Allgather``) per training
    :meth:`forward`, of ``2 + 2C`` float64 values per rank (an ok flag, the
    local count, per-channel mean and M2), and exactly one per training
    :meth:`backward`, of ``1 + 2C`` values (an ok flag, per-channel
    ``sum(dy)`` and ``sum(dy * (x - mean))``). Evaluation mode is plain
    :class:`BatchNorm` and communicates nothing.

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

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         axis=axis, dtype=dtype)
        self.comm = _comm_world() if comm is None else _check_comm(comm)

    @classmethod
    def from_batchnorm(cls, bn, comm=None):
        """A SyncBatchNorm with the settings, parameters, running statistics
        and mode of ``bn`` (copied).

        Parameters
        ----------
        bn : BatchNorm
            The layer to convert.
        comm : mpi4py.MPI.Comm, optional
            As in the constructor.

        Returns
        -------
        SyncBatchNorm
        """
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn must be a BatchNorm, got {type(bn).__name__}")
        if type(bn).forward not in (BatchNorm.forward, SyncBatchNorm.forward):
            raise TypeError(f"cannot synchronize a {type(bn).__name__}: its forward is not "
                            "BatchNorm's")
        if getattr(bn, "virtual_batch_size", None) is not None:
            raise ValueError("cannot synchronize ghost batch normalization "
                             f"(virtual_batch_size={bn.virtual_batch_size})")
        if getattr(bn, "activation", None) is not None:
            raise ValueError(f"cannot synchronize a fused activation (activation={bn.activation!r})")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  axis=bn.axis, dtype=bn.dtype, comm=comm)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)

    def __repr__(self):
        return "Sync" + super().__repr__()

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
            raise RuntimeError(f"SyncBatchNorm.{where} failed on rank(s) {failed.tolist()} of "
                               f"{size} (see the error there); nothing was changed")
        return rows

    def forward(self, x, out=None):
        """Normalize this rank's slice ``x`` of the global batch.

        In training mode this is a collective call (every rank of ``comm``
        must make it), normalizing with the statistics of all ranks' inputs
        and updating the running statistics with them. In evaluation mode it
        is :meth:`BatchNorm.forward`.

        Parameters
        ----------
        x : ndarray
            float32 or float64 with ``num_features`` channels on ``axis``; in
            training it may hold no values.
        out : ndarray, optional
            Where to write the output (shape and dtype of ``x``).

        Returns
        -------
        ndarray
            The output, in the dtype of ``x``.
        """
        if not self.training:
            return super().forward(x, out=out)
        c = self.num_features
        send = np.zeros(2 + 2 * c)
        error = layout = None
        try:
            x = check.as_array(x)
            check.check_input(x, self.axis, c, allow_empty=True)
            out = np.empty_like(x) if out is None else check.check_out(out, x)
            if x.size:
                layout = layout_of(x.shape, self.axis)
                mean, var = moments(x, layout)
                send[1], send[2:2 + c], send[2 + c:] = layout.count, mean, var * layout.count
            send[0] = 1.0
        except Exception as err:  # noqa: BLE001 - raised after the collective
            error = err
        rows = self._gather(send, error, "forward")
        counts = rows[:, 1].copy()
        count = counts.sum()  # exact: integers
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{count:.0f} over {rows.shape[0]} rank(s) (input shape here {x.shape})")
        mean, m2 = merge_moments(counts, np.ascontiguousarray(rows[:, 2:2 + c]),
                                 np.ascontiguousarray(rows[:, 2 + c:]))
        var = m2 / count
        if self.running_mean is not None:
            factor = self.momentum
            if factor is None:
                factor = 1.0 / (self.num_batches_tracked + 1)
            self.num_batches_tracked += _update_running(
                self.running_mean, self.running_var, mean, var, count, factor)
        weight = check.channel_vector(self.gamma, "weight", c)
        bias = check.channel_vector(self.beta, "bias", c)
        if layout is not None:
            y, invstd = normalize(x, layout, mean, var, weight, bias, self.eps, out)
        else:
            y, invstd = out, 1.0 / np.sqrt(var + self.eps)
        overwritten = np.may_share_memory(out, x)
        self._saved = _Synced(x, layout, mean, invstd, count, overwritten)
        return y

    def backward(self, dy, out=None):
        """Gradient with respect to this rank's input of the most recent forward.

        After a training forward this is a collective call; otherwise it is
        :meth:`BatchNorm.backward`. Sets ``grad_gamma`` and ``grad_beta`` to
        this rank's contributions (None without ``affine``).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to this rank's output.
        out : ndarray, optional
            Where to write the input gradient.

        Returns
        -------
        ndarray
            The input gradient.
        """
        if not isinstance(self._saved, _Synced):
            return super().backward(dy, out=out)
        x, layout, mean, invstd, count, overwritten = self._saved
        c = self.num_features
        send = np.zeros(1 + 2 * c)
        error = None
        try:
            if overwritten:
                raise RuntimeError("the forward's input was overwritten by its out= argument; "
                                   "backward needs it")
            dy = check.as_array(dy, "dy")
            check.check_like(dy, x, "dy")
            out = np.empty_like(x) if out is None else check.check_out(out, x)
            if layout is not None:
                send[1:1 + c], send[1 + c:] = grad_sums(x, dy, layout, mean)
            send[0] = 1.0
        except Exception as err:  # noqa: BLE001 - raised after the collective
            error = err
        rows = self._gather(send, error, "backward")
        total = rows[0, 1:].copy()
        for row in rows[1:]:  # fixed order: the same bits on every rank
            total += row[1:]
        weight = check.channel_vector(self.gamma, "weight", c)
        if layout is not None:
            a, b, shift = grad_coefficients(total[:c], total[c:], invstd, weight, count)
            grad_input(dy, x, layout, a, b, shift, mean, out)
        if self.affine:
            s_dy, s_dyx = send[1:1 + c], send[1 + c:]
            self.grad_gamma = (s_dyx * invstd).astype(x.dtype).astype(self.dtype)
            self.grad_beta = s_dy.astype(x.dtype).astype(self.dtype)
        return out
