"""The engines that ``python -m nbbn bench`` and the asv suite (``asv_bench/``)
compare, in one table: nbbn, a plain vectorized NumPy batch norm, PyTorch (as
its users call it, and with preallocated outputs), and for the fused ReLU step
nbbn followed by a NumPy ReLU.

An engine is built once per input (allocating its outputs, computing the
statistics the backward needs); :meth:`Engine.operation` returns the callable
for an operation. The first call of that callable compiles or loads nbbn's
kernels, so time only later calls. Every operation returns what it computed
(``y``; or ``(dx, dweight, dbias)``), so the tests check each engine against
the float64 reference of ``tests/naive.py``.
"""
import numpy as np

__all__ = ["OPERATIONS", "TRAFFIC", "ENGINES", "DEFAULT_ENGINES", "DTYPES", "dtype_named",
           "make_inputs", "Engine"]

#: forward-train: batch statistics, running statistics, output; forward-eval:
#: running statistics; backward: training backward (dx, dweight, dbias);
#: relu-step: forward-train of BatchNorm + ReLU, then its backward.
OPERATIONS = ("forward-train", "forward-eval", "backward", "relu-step")
#: Memory traffic of each operation in units of the input's size: the reads
#: and writes of the minimal passes (statistics need x once before y can be
#: written: 2 reads + 1 write; eval 1 + 1; backward reads x and dy twice and
#: writes dx; the ReLU step adds the saved output y to both backward passes).
TRAFFIC = {"forward-train": 3, "forward-eval": 2, "backward": 5, "relu-step": 10}
MOMENTUM, EPS = 0.1, 1e-5
#: Seconds to wait after a sample of torch before timing anything else: its
#: OpenMP threads keep spinning for several milliseconds after each call (about
#: 7 ms measured here, slowing the next calls on the same cores by 40%).
TORCH_SETTLE_S = 0.02


#: The input dtypes the engines take. Half inputs (float16, bfloat16) run in
#: the mixed-precision layout: float32 parameters and running statistics.
DTYPES = ("float32", "float64", "float16", "bfloat16")


def dtype_named(name):
    """The NumPy dtype called ``name`` (of :data:`DTYPES`); bfloat16 is
    ml_dtypes' (the extra ``bfloat16``)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise SystemExit("bfloat16 needs ml_dtypes: pip install 'nbbn[bfloat16]'") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _param_dtype(dtype):
    """Parameters' and running statistics' dtype for inputs of ``dtype``."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def make_inputs(shape, dtype=np.float32, seed=0):
    """``(x, dy)`` of ``shape``: x normal with mean 0.5 and std 2, dy standard normal."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2
    x += 0.5
    return x.astype(dtype, copy=False), rng.standard_normal(shape, dtype=np.float32).astype(
        dtype, copy=False)


def _params(c, dtype):
    rng = np.random.default_rng(1)
    return rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)


class Engine:
    """Base: ``operation(name)`` is the bound method for ``name``; the
    channels on ``axis`` (1: (N, C, ...); -1: channels-last (N, ..., C))."""

    name = ""
    operations = ()
    settle_s = 0.0  # seconds its threads keep the cores busy after a call

    def __init__(self, x, dy, threads=None, axis=1):
        self.x, self.dy, self.axis = x, dy, axis
        self.channels = x.shape[axis]
        dtype = _param_dtype(x.dtype)
        self.weight, self.bias = _params(self.channels, dtype)
        self.running_mean = np.zeros(self.channels, dtype)
        self.running_var = np.ones(self.channels, dtype)

    def operation(self, op):
        if op not in self.operations:
            raise NotImplementedError(f"{self.name} has no {op}")
        return getattr(self, op.replace("-", "_"))


class NbbnEngine(Engine):
    """nbbn's functional API writing into preallocated outputs; the ReLU step
    through ``BatchNorm(activation='relu')``."""

    name = "nbbn"
    operations = OPERATIONS

    def __init__(self, x, dy, threads=None, axis=1):
        super().__init__(x, dy, axis=axis)
        from .. import functional
        self.f = functional
        self.y, self.dx = np.empty_like(x), np.empty_like(x)
        _, self.mean, self.invstd = functional.native_batch_norm(
            x, None, None, self.weight, self.bias, True, MOMENTUM, EPS, axis=axis)
        self.layer = None

    def forward_train(self):
        return self.f.batch_norm(self.x, self.running_mean, self.running_var, self.weight,
                                 self.bias, True, MOMENTUM, EPS, axis=self.axis, out=self.y)

    def forward_eval(self):
        return self.f.batch_norm(self.x, self.running_mean, self.running_var, self.weight,
                                 self.bias, False, MOMENTUM, EPS, axis=self.axis, out=self.y)

    def backward(self):
        return self.f.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.weight,
                                          True, axis=self.axis, out=self.dx)

    def relu_step(self):
        if self.layer is None:
            from ..batchnorm import BatchNorm
            self.layer = BatchNorm(self.channels, dtype=self.x.dtype, axis=self.axis,
                                   activation="relu")
            self.layer.gamma[:], self.layer.beta[:] = self.weight, self.bias
        self.layer(self.x, out=self.y)
        dx = self.layer.backward(self.dy, out=self.dx)
        return dx, self.layer.grad_gamma, self.layer.grad_beta


class NbbnNumpyReluEngine(NbbnEngine):
    """The unfused baseline of the ReLU step: ``BatchNorm``, then ``np.maximum``;
    backward: ``dy * (a > 0)``, then ``BatchNorm.backward``."""

    name = "nbbn+numpy-relu"
    operations = ("relu-step",)

    def relu_step(self):
        if self.layer is None:
            from ..batchnorm import BatchNorm
            self.layer = BatchNorm(self.channels, dtype=self.x.dtype, axis=self.axis)
            self.layer.gamma[:], self.layer.beta[:] = self.weight, self.bias
        a = np.maximum(self.layer(self.x, out=self.y), 0)
        dx = self.layer.backward(self.dy * (a > 0), out=self.dx)
        return dx, self.layer.grad_gamma, self.layer.grad_beta


class NumpyEngine(Engine):
    """Plain vectorized NumPy: ``x.mean``/``x.var`` over the non-channel axes,
    broadcasting for the rest; in the input's dtype, or for half inputs in
    float32 with the results rounded back to the half type."""

    name = "numpy"
    operations = ("forward-train", "forward-eval", "backward")

    def __init__(self, x, dy, threads=None, axis=1):
        super().__init__(x, dy, axis=axis)
        self.acc = _param_dtype(x.dtype)
        channel_axis = axis % x.ndim
        self.axes = tuple(i for i in range(x.ndim) if i != channel_axis)
        self.bshape = tuple(-1 if i == channel_axis else 1 for i in range(x.ndim))
        self.count = x.size // self.channels
        self.weight = self.weight.reshape(self.bshape)
        self.bias = self.bias.reshape(self.bshape)
        self.mean = self._mean(x)
        self.invstd = 1 / np.sqrt(self._var(x) + EPS)

    def _mean(self, a):
        return a.mean(axis=self.axes, dtype=self.acc, keepdims=True)

    def _var(self, a):
        return a.var(axis=self.axes, dtype=self.acc, keepdims=True)

    def _narrow(self, a):
        return a.astype(self.x.dtype, copy=False)

    def forward_train(self):
        x, n = self.x, self.count
        mean, var = self._mean(x), self._var(x)
        scale = self.weight / np.sqrt(var + EPS)
        y = x * scale + (self.bias - mean * scale)
        self.running_mean = (1 - MOMENTUM) * self.running_mean + MOMENTUM * mean.ravel()
        self.running_var = ((1 - MOMENTUM) * self.running_var
                            + MOMENTUM * var.ravel() * (n / (n - 1)))
        return self._narrow(y)

    def forward_eval(self):
        scale = self.weight / np.sqrt(self.running_var.reshape(self.bshape) + EPS)
        return self._narrow(
            self.x * scale + (self.bias - self.running_mean.reshape(self.bshape) * scale))

    def backward(self):
        x_hat = (self.x - self.mean) * self.invstd
        dbias = self.dy.sum(axis=self.axes, dtype=self.acc, keepdims=True)
        dweight = (self.dy * x_hat).sum(axis=self.axes, dtype=self.acc, keepdims=True)
        n = self.count
        dx = (self.weight * self.invstd / n) * (n * self.dy - dbias - x_hat * dweight)
        return self._narrow(dx), dweight.ravel(), dbias.ravel()


def _tensor(a):
    """``a`` as a torch tensor sharing its memory (bfloat16 through its bits)."""
    import torch
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _array(t):
    """Tensor ``t`` as a NumPy array sharing its memory (bfloat16: ml_dtypes')."""
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype_named("bfloat16"))
    return t.numpy()


class TorchEngine(Engine):
    """PyTorch as its users call it: ``torch.nn.functional.batch_norm`` for
    the forwards, the aten kernel autograd runs for the backward
    (``native_batch_norm_backward``), each allocating its outputs; the ReLU
    step is ``relu(batch_norm(x))`` with autograd. Channels-last arrays are
    torch's ``channels_last`` tensors (the same memory, channels moved to
    dimension 1). Raises NotImplementedError when torch is not installed
    (asv then skips the parameter)."""

    name = "torch"
    operations = OPERATIONS
    settle_s = TORCH_SETTLE_S

    def __init__(self, x, dy, threads=None, axis=1):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        super().__init__(x, dy, axis=axis)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        t = _tensor
        self.tx, self.tdy = self._torch_layout(t(x)), self._torch_layout(t(dy))
        self.tw, self.tb = t(self.weight), t(self.bias)
        self.trm, self.trv = t(self.running_mean), t(self.running_var)
        _, self.save_mean, self.save_invstd = torch.native_batch_norm(
            self.tx, self.tw, self.tb, None, None, True, MOMENTUM, EPS)

    def _torch_layout(self, t):
        """An input of ours as torch takes it: channels on dimension 1."""
        return t if self.axis == 1 else t.movedim(-1, 1)

    def _ours(self, t):
        """A torch output shaped as our input (channels back on ``axis``)."""
        return _array(t if self.axis == 1 else t.movedim(1, -1))

    def _forward(self, training):
        return self._ours(self.torch.nn.functional.batch_norm(
            self.tx, self.trm, self.trv, self.tw, self.tb, training, MOMENTUM, EPS))

    def forward_train(self):
        return self._forward(True)

    def forward_eval(self):
        return self._forward(False)

    def backward(self):
        out = self.torch.ops.aten.native_batch_norm_backward(
            self.tdy, self.tx, self.tw, self.trm, self.trv, self.save_mean, self.save_invstd,
            True, EPS, [True, True, True])
        return (self._ours(out[0]),) + tuple(_array(v) for v in out[1:])

    def relu_step(self):
        torch = self.torch
        x = self.tx.detach().requires_grad_(True)
        w = self.tw.detach().requires_grad_(True)
        b = self.tb.detach().requires_grad_(True)
        y = torch.relu(torch.nn.functional.batch_norm(x, self.trm, self.trv, w, b, True,
                                                      MOMENTUM, EPS))
        y.backward(self.tdy)
        return self._ours(x.grad), _array(w.grad), _array(b.grad)


class TorchOutEngine(TorchEngine):
    """PyTorch's kernels writing into preallocated outputs, as nbbn does with
    ``out=``: ``aten.native_batch_norm.out`` and ``native_batch_norm_backward.out``
    (not part of torch's documented API)."""

    name = "torch-out"
    operations = ("forward-train", "forward-eval", "backward")

    def __init__(self, x, dy, threads=None, axis=1):
        super().__init__(x, dy, threads, axis)
        torch = self.torch
        if not (self.tx.is_contiguous() or self.tx.dim() in (4, 5)):
            # A 3-D channels-last input is a strided tensor in no memory format of
            # torch's, and native_batch_norm.out normalizes it wrongly (torch 2.13).
            raise NotImplementedError("torch-out takes no 3-D channels-last input")
        self.y, self.dx = torch.empty_like(self.tx), torch.empty_like(self.tx)
        self.dw, self.db = torch.empty_like(self.tw), torch.empty_like(self.tw)
        self.unused = (torch.empty_like(self.tw), torch.empty_like(self.tw))

    def forward_train(self):
        return self._ours(self.torch.ops.aten.native_batch_norm.out(
            self.tx, self.tw, self.tb, self.trm, self.trv, True, MOMENTUM, EPS, out=self.y,
            save_mean=self.unused[0], save_invstd=self.unused[1])[0])

    def forward_eval(self):
        return self._ours(self.torch.ops.aten.native_batch_norm.out(
            self.tx, self.tw, self.tb, self.trm, self.trv, False, MOMENTUM, EPS, out=self.y,
            save_mean=self.unused[0], save_invstd=self.unused[1])[0])

    def backward(self):
        out = self.torch.ops.aten.native_batch_norm_backward.out(
            self.tdy, self.tx, self.tw, self.trm, self.trv, self.save_mean, self.save_invstd,
            True, EPS, [True, True, True], out0=self.dx, out1=self.dw, out2=self.db)
        return (self._ours(out[0]),) + tuple(_array(v) for v in out[1:])


#: name -> engine class, in the order tables show them.
ENGINES = {e.name: e for e in (NbbnEngine, NumpyEngine, TorchEngine, NbbnNumpyReluEngine,
                               TorchOutEngine)}
#: The engines a bench run uses unless told otherwise.
DEFAULT_ENGINES = ("nbbn", "numpy", "torch", "nbbn+numpy-relu")
