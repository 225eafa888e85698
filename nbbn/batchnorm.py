"""The stateful BatchNorm layer."""
import numpy as np

from .gpu import backend as _cuda, layers as _cuda_layers
from . import _validation as check
from .functional import batch_norm_backward, forward

_KEYS_AFFINE = ("weight", "bias")
_KEYS_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


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
    axis : {1, -1}
        Channel axis: 1 for (N, C, ...) inputs, -1 for channels-last (..., C).
    dtype : {numpy.float32, numpy.float64}
        dtype of the parameters and running statistics.
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
    device : {'cpu', 'cuda'}
        Where the parameters live and the layer computes; see :meth:`to`.

    Notes
    -----
    :meth:`backward` keeps a reference to the last forward's input (and, with
    an ``activation``, to its output): modify them in between and the
    gradients are wrong.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, activation=None,
                 virtual_batch_size=None, device="cpu"):
        self.num_features = check.num_features(num_features)
        self.eps = check.eps(eps)
        self.momentum = check.momentum(momentum, allow_none=True)
        self.axis = check.check_axis(axis)
        self.dtype = check.float_dtype(dtype)
        self.activation = check.activation(activation)
        self.virtual_batch_size = check.virtual_batch_size(virtual_batch_size)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        c, dt = self.num_features, self.dtype
        self.gamma = np.ones(c, dt) if self.affine else None
        self.beta = np.zeros(c, dt) if self.affine else None
        self.running_mean = np.zeros(c, dt) if self.track_running_stats else None
        self.running_var = np.ones(c, dt) if self.track_running_stats else None
        self.num_batches_tracked = 0
        self.training = True
        self.grad_gamma = self.grad_beta = None
        self._saved = self._saved_output = None
        self.device = "cpu"
        self.to(device)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}"
                + (f", activation={self.activation!r}" if self.activation is not None else "")
                + (f", virtual_batch_size={self.virtual_batch_size}"
                   if self.virtual_batch_size is not None else "")
                + (f", device={self.device!r}" if self.device != "cpu" else "") + ")")

    def train(self, mode=True):
        """Set training mode (batch statistics, running updates); return self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics); return self."""
        return self.train(False)

    def to(self, device):
        """Move the parameters, running statistics and gradients to ``device``;
        return self.

        On ``'cuda'`` (``numba.cuda``, imported now), :meth:`forward` and
        :meth:`backward` take NumPy arrays (copied to the GPU) or device arrays
        (``__cuda_array_interface__``) and return Numba device arrays; ``gamma``,
        ``beta`` and the running statistics are device arrays;
        :meth:`state_dict` still returns NumPy arrays. A pending :meth:`backward`
        is dropped.

        Raises
        ------
        RuntimeError
            ``'cuda'`` without a GPU (nor ``NUMBA_ENABLE_CUDASIM=1``), or
            (``NotImplementedError``) for a subclass with its own forward and no
            GPU path, such as ``SyncBatchNorm``.
        """
        device = _cuda.check_device(device)
        if device == self.device:
            return self
        if device == "cuda":
            if type(self).forward is not type(self)._gpu_forward:
                raise NotImplementedError(f"{type(self).__name__} has no GPU path (BatchNorm "
                                          "and BatchRenorm run on device='cuda')")
            _cuda.cuda()
        move = _cuda.to_device if device == "cuda" else _cuda.to_host
        moved = {name: move(getattr(self, name)) for name in
                 ("gamma", "beta", "running_mean", "running_var", "grad_gamma", "grad_beta")
                 if getattr(self, name) is not None}
        for name, value in moved.items():
            setattr(self, name, value)
        self.device, self._saved = device, None
        return self

    def __call__(self, x, out=None):
        return self.forward(x, out=out)

    def forward(self, x, out=None):
        """Normalize ``x``; in training mode also update the running statistics.

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
        x = self._input(x)
        if self.training and self.virtual_batch_size is not None:
            return self._ghost_forward(x, out)
        batch_stats = self.training or self.running_mean is None
        tracking = self.training and self.running_mean is not None
        factor = self.momentum
        if tracking and factor is None:
            factor = 1.0 / (self.num_batches_tracked + 1)
        y, mean, invstd, updated = forward(
            x, self.running_mean, self.running_var, self.gamma, self.beta, batch_stats,
            0.0 if factor is None else factor, self.eps, axis=self.axis, out=out,
            num_features=self.num_features, activation=self.activation)
        self.num_batches_tracked += updated
        if self.device == "cuda":
            overwritten = out is not None and _cuda.shares_memory(y, x)
        else:
            overwritten = out is not None and np.may_share_memory(out, x)
        self._saved = (x, mean, invstd, batch_stats, overwritten)
        self._saved_output = y if self.activation is not None else None
        return y

    #: The forward that also runs on ``device='cuda'``: a subclass that
    #: overrides :meth:`forward` has no GPU path unless it sets this to its own.
    _gpu_forward = forward

    def _input(self, x):
        """``x`` checked and on the layer's device (NumPy input is copied to the GPU)."""
        if self.device == "cuda":
            return _cuda.as_input(x)
        if _cuda.is_device_array(x):
            raise TypeError("x is a device array but the layer is on the CPU: "
                            "move the layer with .to('cuda') or pass a NumPy array")
        return check.as_array(x)

    def backward(self, dy, out=None):
        """Gradient with respect to the input of the most recent forward.

        Sets ``grad_gamma`` and ``grad_beta`` (None without ``affine``).

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
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        x, mean, invstd, batch_stats, overwritten = self._saved
        if overwritten:
            raise RuntimeError("the forward's input was overwritten by its out= argument; "
                               "backward needs it")
        if isinstance(mean, list):
            return self._ghost_backward(dy, out, x, mean)
        dx, dgamma, dbeta = batch_norm_backward(dy, x, mean, invstd, self.gamma, batch_stats,
                                                axis=self.axis, out=out, y=self._saved_output,
                                                activation=self.activation)
        if self.affine and self.device == "cuda":
            self.grad_gamma = _cuda.astype(dgamma, self.dtype)
            self.grad_beta = _cuda.astype(dbeta, self.dtype)
        elif self.affine:
            self.grad_gamma, self.grad_beta = dgamma.astype(self.dtype), dbeta.astype(self.dtype)
        return dx

    def _ghost_forward(self, x, out):
        """Training forward of ghost batch normalization: each group of
        ``virtual_batch_size`` samples along axis 0 is a batch of its own."""
        channels = check.check_input(_cuda.meta(x), self.axis, self.num_features)
        out = _cuda_layers.output_like(x, out)
        k, n = self.virtual_batch_size, x.shape[0]
        bounds = [(lo, min(lo + k, n)) for lo in range(0, n, k)]
        for lo, hi in (bounds[0], bounds[-1]):
            try:
                check.check_batch_size(_cuda.meta(x[lo:hi]), channels)
            except ValueError as e:
                raise ValueError(f"{e} (samples {lo}:{hi} of a batch of shape {tuple(x.shape)}, "
                                 f"virtual_batch_size={k})") from None
        groups = []
        for lo, hi in bounds:
            factor = self.momentum
            if factor is None:
                factor = 1.0 / (self.num_batches_tracked + 1)
            _, mean, invstd, updated = forward(
                x[lo:hi], self.running_mean, self.running_var, self.gamma, self.beta, True,
                factor, self.eps, axis=self.axis, out=out[lo:hi], activation=self.activation)
            self.num_batches_tracked += updated
            groups.append((slice(lo, hi), mean, invstd))
        overwritten = _cuda.shares_memory(out, x)
        self._saved = (x, groups, None, True, overwritten)
        self._saved_output = out if self.activation is not None else None
        return out

    def _ghost_backward(self, dy, out, x, groups):
        """Backward of :meth:`_ghost_forward`, group by group."""
        dy = _cuda_layers.input_like(dy, x, "dy")
        out = _cuda_layers.output_like(x, out)
        dgamma, dbeta = [], []
        for part, mean, invstd in groups:
            y = None if self._saved_output is None else self._saved_output[part]
            _, dw, db = batch_norm_backward(dy[part], x[part], mean, invstd, self.gamma, True,
                                            axis=self.axis, out=out[part], y=y,
                                            activation=self.activation)
            dgamma.append(dw)
            dbeta.append(db)
        if self.affine:
            self.grad_gamma = _cuda_layers.channel_sum(dgamma, self.dtype)
            self.grad_beta = _cuda_layers.channel_sum(dbeta, self.dtype)
        return out

    def _state_keys(self):
        return (_KEYS_AFFINE if self.affine else ()) + (
            _KEYS_RUNNING if self.track_running_stats else ())

    def state_dict(self):
        """Copies of the parameters and running statistics, with the keys of
        ``torch.nn.BatchNorm2d.state_dict()``: NumPy arrays on any device."""
        values = {"weight": self.gamma, "bias": self.beta, "running_mean": self.running_mean,
                  "running_var": self.running_var,
                  "num_batches_tracked": np.array(self.num_batches_tracked, dtype=np.int64)}
        return {k: _cuda.to_host(values[k]) for k in self._state_keys()}

    def load_state_dict(self, state_dict):
        """Load a state (from :meth:`state_dict` or torch): all of it or, on any
        error, nothing."""
        keys = self._state_keys()
        missing = [k for k in keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in keys]
        if missing or unexpected:
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unexpected}")
        new = {}
        for k in keys:
            v = np.asarray(state_dict[k])
            if k == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu" or v < 0:
                    raise ValueError(f"num_batches_tracked must be a non-negative integer, got {v!r}")
                new[k] = int(v)
            else:
                new[k] = check.channel_vector(v, k, self.num_features).astype(self.dtype)
        if self.device == "cuda":
            new = {k: v if k == "num_batches_tracked" else _cuda.to_device(v)
                   for k, v in new.items()}
        for k, attr in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "running_mean"),
                        ("running_var", "running_var"), ("num_batches_tracked", "num_batches_tracked")):
            if k in new:
                setattr(self, attr, new[k])
