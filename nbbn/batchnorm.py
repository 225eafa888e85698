"""The batch normalization layer: one forward/backward template whose parts
plug in independently (Keras 2's and Flax's options of one layer, torch's
names and ``state_dict``):

* where the training statistics come from: the batch, ghost groups of it
  (``virtual_batch_size``), or all ranks of an MPI communicator (``comm``,
  :class:`nbbn.parts.Collective`);
* a correction of the normalization: none, or Batch Renormalization's r and
  d (:class:`nbbn.parts.Renorm`);
* the fused activation (``activation='relu'``);
* the backend, chosen when the layer is built or moved by :meth:`BatchNorm.to`:
  the CPU kernels or the ``numba.cuda`` ones. The layer never branches on
  the device.

When no part works between the statistics and the normalization, a group
takes one call of the backend for its whole forward (and one for its
backward); otherwise the template calls the pieces (statistics, correction,
normalization) itself.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _validation as check
from ._cpu import BACKEND as CPU
from ._types import Activation, Array, ArrayIn, ArrayOut, Axis, Comm, Device
from .parts import Collective, Renorm

if sys.version_info >= (3, 11):
    from typing import Self
elif TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["BatchNorm"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _Group(NamedTuple):
    """What the backward needs of one group (the batch, or a ghost group)."""

    part: Any  # slice of the batch along axis 0, or None for all of it
    mean: Any  # float64 (C,), on the backend
    invstd: Any
    weight: Any  # the weight the normalization used (gamma, gamma * r, r, or None)
    correction: Any  # Batch Renormalization's (r, d), or None
    # values per channel the statistics were taken over (all ranks); None in evaluation
    count: float | None  # type: ignore[assignment]  # (shadows tuple.count)


class _Saved(NamedTuple):
    x: Any
    y: Any  # the output, kept for the ReLU's mask
    groups: list
    batch_stats: bool
    synced: bool  # the backward is collective
    overwritten: bool


def _channel_array(name, present, doc):
    """A per-channel array attribute of the layer, checked when assigned (so
    that every call can trust it): of shape (C,), converted to the layer's
    dtype and device; None exactly when the layer's option ``present`` is off."""
    private = "_" + name

    def assign(self, value):
        if value is None or not getattr(self, present):
            if (value is None) == bool(getattr(self, present)):
                raise ValueError(f"{name} must be {'an array' if value is None else 'None'}: "
                                 f"the layer has {present}={getattr(self, present)}")
        else:
            value = self._backend.parameter(value, name, self.num_features, self.param_dtype)
        setattr(self, private, value)

    return property(attrgetter(private), assign, doc=doc)


def _backend(device):
    if check.device(device) == "cpu":
        return CPU
    from .gpu.backend import BACKEND as GPU
    GPU.check_available()
    return GPU


class BatchNorm:
    """Batch normalization with the semantics of ``torch.nn.BatchNorm{1,2,3}d``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance.
    momentum : float or None
        Weight of each batch in the running averages; None for the
        cumulative average.
    affine : bool
        Learn gamma (``gamma``) and beta (``beta``).
    track_running_stats : bool
        Keep running averages and use them in eval mode; if False, batch
        statistics are used in both modes.
    bias : bool
        With ``affine``, learn beta too (torch 2's ``bias=False``: gamma only).
    axis : {1, -1}
        Channel axis: 1 for (N, C, ...) inputs, -1 for channels-last (..., C).
    dtype : {numpy.float32, numpy.float64, numpy.float16, ml_dtypes.bfloat16}
        The inputs' dtype, and by default that of the parameters and running
        statistics. Any of the four is accepted as input whatever it is; the
        output and input gradient are in the input's dtype, statistics float64
        (docs/mixed-precision.md). 'bfloat16' needs ml_dtypes.
    param_dtype : dtype, optional
        dtype of the parameters, running statistics and parameter gradients:
        by default ``dtype``, or float32 for a half ``dtype`` (torch's mixed
        precision); float16 or bfloat16 keeps them in half (torch's all-half
        layer).
    activation : {None, 'relu'}
        Fuse ``max(y, 0)`` into the normalization pass; :meth:`backward` then
        takes the gradient of the activation's output and recovers the mask
        from the saved output (docs/activation.md).
    virtual_batch_size : int, optional
        Ghost batch normalization: in training, normalize each group of this
        many consecutive samples along axis 0 with its own statistics (the
        last group may be smaller) and update the running statistics once per
        group, in order; ``num_batches_tracked`` counts groups. Evaluation is
        unchanged. None (default) normalizes the whole batch at once.
    comm : mpi4py.MPI.Comm, optional
        Synchronize the training statistics over the ranks of this
        communicator (:class:`~nbbn.SyncBatchNorm`, docs/sync.md).
    device : {'cpu', 'cuda'}
        Where the parameters live and the layer computes; see :meth:`to`.

    Notes
    -----
    :meth:`backward` keeps a reference to the last forward's input (and, with
    an ``activation``, to its output): modify them in between and the
    gradients are wrong.
    """

    gamma: Array | None = _channel_array(
        "gamma", "affine", "The learned scale (C,), or None without ``affine``.")
    beta: Array | None = _channel_array(
        "beta", "bias", "The learned shift (C,), or None without ``bias``.")
    running_mean: Array | None = _channel_array(
        "running_mean", "track_running_stats",
        "The running mean (C,), or None without running statistics.")
    running_var: Array | None = _channel_array(
        "running_var", "track_running_stats",
        "The running variance (C,), or None without running statistics.")
    #: Batch Renormalization's part (:class:`nbbn.parts.Renorm`), or None.
    _correction: Renorm | None = None
    _show_comm = True  # in the repr (SyncBatchNorm's name says it)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
                 axis: Axis = 1, dtype: DTypeLike = np.float32,
                 param_dtype: DTypeLike | None = None, activation: Activation = None,
                 virtual_batch_size: int | None = None, comm: Comm | None = None,
                 device: Device = "cpu") -> None:
        self.num_features: int = check.num_features(num_features)
        self.eps: float = check.eps(eps)
        self.momentum: float | None = check.momentum(momentum, allow_none=True)
        self.axis: Axis = check.check_axis(axis)
        self.dtype: np.dtype[Any] = check.float_dtype(dtype)
        self.param_dtype: np.dtype[Any] = (
            check.float_dtype(param_dtype, "param_dtype") if param_dtype is not None
            else check.grad_dtype(self.dtype))
        self.activation: Activation = check.activation(activation)
        self.virtual_batch_size: int | None = check.virtual_batch_size(virtual_batch_size)
        self._collective = None
        if comm is not None:
            self._collective = Collective(comm)
        self.affine: bool = bool(affine)
        self.bias: bool = bool(bias) and self.affine
        self.track_running_stats: bool = bool(track_running_stats)
        self._backend: Any = CPU  # the CPU backend, or the GPU's (the same methods)
        self.reset_parameters()
        self.training: bool = True
        self.grad_gamma: Array | None = None
        self.grad_beta: Array | None = None
        self._saved: _Saved | None = None
        self._recorder: Any = None  # where nbbn.precise_statistics collects batch statistics
        self.to(device)

    @property
    def comm(self) -> Comm | None:
        """The MPI communicator the training statistics span, or None."""
        return None if self._collective is None else self._collective.comm

    @property
    def num_batches_tracked(self) -> int:
        """Updates of the running statistics so far (torch's). On the GPU it
        is counted on the device: reading it waits for the device, and warns
        about the batches skipped since the last read (docs/gpu.md)."""
        return self._tracked.read()

    @num_batches_tracked.setter
    def num_batches_tracked(self, value: int) -> None:
        if "_tracked" in self.__dict__:
            self._tracked.read()  # (warnings pending on the GPU come now)
        self._tracked = self._backend.counter(int(value))

    @property
    def device(self) -> Device:
        """'cpu' or 'cuda': where the layer computes (see :meth:`to`)."""
        return self._backend.name

    def __repr__(self) -> str:
        options = {"bias": self.bias if self.affine and not self.bias else None,
                   "activation": self.activation, "virtual_batch_size": self.virtual_batch_size,
                   "comm": self.comm if self._show_comm else None,
                   "device": self.device if self.device != "cpu" else None}
        return (f"{type(self).__name__}({self.num_features}, {self._settings()}, "
                f"axis={self.axis}, dtype={self.dtype.name}"
                + (f", param_dtype={self.param_dtype.name}"
                   if self.param_dtype != check.grad_dtype(self.dtype) else "")
                + "".join(f", {k}={v!r}" for k, v in options.items() if v is not None) + ")")

    def _settings(self):
        return (f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    # --- state ------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (torch's)."""
        if self.track_running_stats:
            c, b = self.num_features, self._backend
            self.running_mean = b.full(c, 0.0, self.param_dtype)
            self.running_var = b.full(c, 1.0, self.param_dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and gamma 1, beta 0 (torch's)."""
        self.reset_running_stats()
        c, b = self.num_features, self._backend
        self.gamma = b.full(c, 1.0, self.param_dtype) if self.affine else None
        self.beta = b.full(c, 0.0, self.param_dtype) if self.bias else None

    def train(self, mode: bool = True) -> Self:
        """Set training mode (batch statistics, running updates); return self."""
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        """Set evaluation mode (running statistics); return self."""
        return self.train(False)

    def to(self, device: Device) -> Self:
        """Move the parameters, running statistics and gradients to ``device``;
        return self.

        On ``'cuda'`` (``numba.cuda``, imported now), :meth:`forward` and
        :meth:`backward` take NumPy arrays (copied to the GPU) or device arrays
        (``__cuda_array_interface__``) and return Numba device arrays; ``gamma``,
        ``beta`` and the running statistics are device arrays;
        :meth:`state_dict` still returns NumPy arrays. A pending :meth:`backward`
        is dropped. A synchronized layer stages its per-channel collective
        through the host.

        Raises
        ------
        RuntimeError
            ``'cuda'`` without a GPU (nor ``NUMBA_ENABLE_CUDASIM=1``).
        TypeError
            ``'cuda'`` for a layer of a half ``dtype`` or ``param_dtype``
            (the GPU path computes float32 and float64 only); nothing is moved.
        """
        backend = _backend(device)
        if backend is self._backend:
            return self
        backend.check_dtype(self.dtype, "dtype")
        backend.check_dtype(self.param_dtype, "param_dtype")
        tracked = self.num_batches_tracked
        for name in ("_gamma", "_beta", "_running_mean", "_running_var", "grad_gamma",
                     "grad_beta"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, backend.put(value))
        self._backend, self._saved = backend, None
        self.num_batches_tracked = tracked
        return self

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the parameters and running statistics, with the keys of
        ``torch.nn.BatchNorm2d.state_dict()``: NumPy arrays on any device."""
        values = {"weight": self.gamma, "bias": self.beta, "running_mean": self.running_mean,
                  "running_var": self.running_var,
                  "num_batches_tracked": np.array(self.num_batches_tracked, dtype=np.int64)}
        return {k: self._backend.host(values[k]) for k in self._state_keys()}

    def _state_keys(self):
        keys = (("weight",) if self.affine else ()) + (("bias",) if self.bias else ())
        return keys + (_STATE_KEYS[2:] if self.track_running_stats else ())

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Load a state (from :meth:`state_dict` or torch): all of it or, on any
        error, nothing."""
        keys = self._state_keys()
        missing = [k for k in keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in keys]
        if missing or unexpected:
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unexpected}")
        new: dict[str, Any] = {}
        for k in keys:
            v = np.asarray(state_dict[k])
            if k == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu" or v < 0:
                    raise ValueError(f"num_batches_tracked must be a non-negative integer, got {v!r}")
                new[k] = int(v)
            else:
                new[k] = self._backend.put(
                    check.channel_vector(v, k, self.num_features).astype(self.param_dtype))
        for k, attr in zip(_STATE_KEYS, ("gamma", "beta", "running_mean", "running_var",
                                         "num_batches_tracked")):
            if k in new:
                setattr(self, attr, new[k])

    # --- forward ----------------------------------------------------------------
    def __call__(self, x: ArrayIn, out: ArrayOut | None = None) -> Array:
        return self.forward(x, out=out)

    def forward(self, x: ArrayIn, out: ArrayOut | None = None) -> Array:
        """Normalize ``x``; in training mode also update the running statistics.

        With ``comm``, a training forward is a collective call: every rank
        makes it, with its own slice of the batch (which may be empty).

        Parameters
        ----------
        x : ndarray
            float16, bfloat16, float32 or float64 with ``num_features``
            channels on ``axis``.
        out : ndarray, optional
            Where to write the output (shape and dtype of ``x``).

        Returns
        -------
        ndarray
            The output, in the dtype of ``x``.
        """
        b = self._backend
        batch_stats = self.training or self.running_mean is None
        synced = self.training and self._collective is not None
        error, groups, last = None, [None], 0
        try:
            x = b.input(x)
            check.check_input(b.meta(x), self.axis, self.num_features)
            out = b.output(out, x)
            # (x is the checked array now; mypy keeps its declared type: the ignores)
            if batch_stats and self.training and (x.size or synced):  # type: ignore[union-attr]
                groups = self._groups(x, synced)
                last = (x if groups[-1] is None  # type: ignore[union-attr]
                        else x[groups[-1]]).size // self.num_features  # type: ignore[index,call-overload]
        except Exception as err:  # noqa: BLE001 - a collective must still take place
            if not synced:
                raise
            error = err
        # no samples, nothing to normalize; torch counts it
        if not synced and not x.size:  # type: ignore[union-attr]
            self.num_batches_tracked += (self.training and self.running_mean is not None
                                         and self._recorder is None)
            self._saved = _Saved(x, None, [], batch_stats, False, False)
            return out
        if not batch_stats:
            mean, invstd = b.evaluate(x, self.axis, self.running_mean, self.running_var,
                                      self.gamma, self.beta, self.eps,
                                      self.activation is not None, out)
            saved = [_Group(None, mean, invstd, self.gamma, None, None)]
        else:
            saved = []
            for i, part in enumerate(groups):
                first = None if i else (error, len(groups), last)
                saved.append(self._train_group(x, out, part, first, synced))
        self._saved = _Saved(x, out if self.activation is not None else None, saved, batch_stats,
                             synced, b.shares_memory(out, x))
        return out

    def _groups(self, x, synced):
        """The parts of the batch with statistics of their own: ghost groups
        of ``virtual_batch_size`` samples along axis 0, or all of it (None)."""
        k, n = self.virtual_batch_size, x.shape[0]
        parts = [None] if k is None or n <= k else [slice(lo, min(lo + k, n))
                                                    for lo in range(0, n, k)]
        for part in () if synced else (parts[0], parts[-1]):
            try:
                check.check_batch_size(self._backend.meta(x if part is None else x[part]),
                                       self.num_features)
            except ValueError as e:
                if k is None:
                    raise
                lo, hi = (0, n) if part is None else (part.start, part.stop)
                raise ValueError(f"{e} (samples {lo}:{hi} of a batch of shape {tuple(x.shape)}, "
                                 f"virtual_batch_size={k})") from None
        return parts

    def _factor(self):
        return self._tracked.factor(self.momentum)

    def _train_group(self, x, out, part, first, synced):
        """Training forward of one group: statistics, running update, output.
        ``first`` (the first group only): a pending error, the number of
        groups and the last group, which a collective checks on every rank."""
        b, relu = self._backend, self.activation is not None
        if first is not None and first[0] is not None:
            xg = og = None
        else:
            xg, og = (x, out) if part is None else (x[part], out[part])
        tracking = self.running_mean is not None
        if not synced and self._correction is None and self._recorder is None:
            mean, invstd, updated = b.train(
                xg, self.axis, self.running_mean, self.running_var, self._factor(), self.gamma,
                self.beta, self.eps, relu, og)
            self._count(tracking, updated)
            return _Group(part, mean, invstd, self.gamma, None, None)
        if synced:
            mean, var, count = self._collective.moments(b, xg, self.axis, self.num_features,
                                                        first)
        else:
            mean, var = b.moments(xg, self.axis)
            count = xg.size / self.num_features
        weight, bias, correction = self.gamma, self.beta, None
        if self._recorder is not None:
            self._recorder.add(b.host(mean), b.host(var), count)
        elif self._correction is not None:
            weight, bias, correction, updated = self._correction.correct(
                b, mean, var, self.running_mean, self.running_var, self.gamma, self.beta,
                self.eps, self._factor())
            self._count(tracking, updated)
        else:
            self._count(tracking, tracking and b.update_running(
                self.running_mean, self.running_var, mean, var, count, self._factor()))
        invstd = b.evaluate(xg, self.axis, mean, var, weight, bias, self.eps, relu, og)[1] \
            if xg.size else b.invstd(var, self.eps)
        return _Group(part, mean, invstd, weight, correction, count)

    def _count(self, tracking, updated):
        what = "moving statistics" if self._correction is not None else "running statistics"
        if tracking and not self._tracked.record(updated, what):
            check.warn_not_finite(4, what)

    # --- backward ---------------------------------------------------------------
    def backward(self, dy: ArrayIn, out: ArrayOut | None = None) -> Array:
        """Gradient with respect to the input of the most recent forward.

        Sets ``grad_gamma`` and ``grad_beta`` (None without ``affine``); with
        ``comm``, after a training forward, this is a collective call, and they
        are this rank's contributions (reduce them with the other parameters'
        gradients).

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
        saved, b = self._saved, self._backend
        if saved is None:
            raise RuntimeError("backward() called before any forward()")
        error = None
        try:
            if saved.overwritten:
                raise RuntimeError("the forward's input was overwritten by its out= argument; "
                                   "backward needs it")
            dy = b.like(dy, saved.x, "dy")
            out = b.output(out, saved.x)
        except Exception as err:  # noqa: BLE001 - a collective must still take place
            if not saved.synced:
                raise
            error = err
        grads = [self._backward_group(saved, g, dy, out, error) for g in saved.groups]
        if not grads:  # an empty batch
            grads = [(b.full(self.num_features, 0.0, self.param_dtype),) * 2]
        if self.affine:
            self.grad_gamma = b.channel_sum([g[0] for g in grads], self.param_dtype)
        if self.bias:
            self.grad_beta = b.channel_sum([g[1] for g in grads], self.param_dtype)
        return out

    def _backward_group(self, saved, group, dy, out, error):
        """Input gradient of one group into ``out``; ``(dgamma, dbeta)``."""
        b, part = self._backend, group.part
        xg = saved.x if part is None else saved.x[part]
        dyg, og = (dy, out) if part is None or error is not None else (dy[part], out[part])
        mask = saved.y if part is None or saved.y is None else saved.y[part]
        if not saved.synced:
            dweight, dbias = b.backward(dyg, xg, self.axis, mask, group.mean, group.invstd,
                                        group.weight, saved.batch_stats, og)
        else:
            dweight, dbias = self._collective.backward(b, dyg, xg, self.axis, mask, group, og,
                                                       error)
        if group.correction is not None:
            dweight = b.renorm_grads(*group.correction, dweight, dbias)
        return dweight, dbias
