"""The CPU backend: NumPy arrays in and out, the kernels of ``nbbn.kernels``
through ``nbbn._engine``. The GPU backend (``nbbn.gpu.backend.GPU``) has the
same methods, so the layers and the functional API run one code path on
either device; arrays reaching a backend's compute methods are validated.
Per-channel statistics are float64 (C,) arrays. Half arrays (float16,
bfloat16) reach the kernels as their 16-bit views (``nbbn._half``), half
running statistics as float32 copies (written back); ``nbbn._engine``
converts the other per-channel arrays as the kernels take them.
"""
import numpy as np

from . import _engine as engine
from . import _validation as check
from ._validation import kernel_view


def _wide(v):
    """Running statistics ``v`` (None, or a float array) as the kernels update
    them: a half one as a float32 copy (exact), written back after."""
    if v is None or v.dtype.itemsize != 2:
        return v
    return v.astype(np.float32) if check.is_half(v.dtype) else v


def _view(mask):
    """A saved output the backward masks with (None, or an array) as the kernels take it."""
    return None if mask is None else kernel_view(mask)


def _write_back(running, wide, updated):
    """Store a float32 copy made by :func:`_wide` back into the half array."""
    if updated and wide is not running:
        running[...] = wide.astype(running.dtype)


class Count:
    """``num_batches_tracked`` of a layer on the CPU (the GPU's,
    ``nbbn.gpu.backend.Counter``, stays on the device)."""

    def __init__(self, value=0):
        self.value = value

    def factor(self, momentum):
        """The weight of the next batch: ``momentum``, or cumulative if None."""
        return 1.0 / (self.value + 1) if momentum is None else momentum

    def record(self, updated, what):
        """Count an update; False (the caller warns) for a skipped batch."""
        self.value += bool(updated)
        return bool(updated)

    def read(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, Count) and other.value == self.value


class CPU:
    """Batch normalization on NumPy arrays (see the module docstring)."""

    name = "cpu"
    counter = Count

    # --- arrays ---------------------------------------------------------------
    @staticmethod
    def input(x, name="x"):
        """``x`` as an array the kernels can read (a copy only if needed)."""
        if type(x) is not np.ndarray and check.is_device_array(x):
            raise TypeError(f"{name} is a device array but the layer is on the CPU: move the "
                            "layer with .to('cuda') or pass a NumPy array")
        return check.as_array(x, name)

    @classmethod
    def like(cls, a, x, name):
        """Input ``a`` (``dy``, a saved output) checked against ``x``."""
        a = cls.input(a, name)
        check.check_like(a, x, name)
        return a

    @staticmethod
    def output(out, x):
        """``out`` checked against ``x``, or a new array like ``x``."""
        return np.empty_like(x) if out is None else check.check_out(out, x)

    @staticmethod
    def vector(v, name, channels):
        """A per-channel parameter for the kernels: float32 or float64 (a half
        one widened), or None."""
        return check.channel_vector(v, name, channels, widen=False)

    @staticmethod
    def parameter(value, name, channels, dtype):
        """``value`` as a layer's per-channel array: (C,), in ``dtype``, writable
        (converted if needed)."""
        if check.is_device_array(value):
            raise TypeError(f"{name} is a device array but the layer is on the CPU")
        a = np.asarray(value)
        if a.dtype.kind not in "fiu" and not check.is_half(a.dtype):
            raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
        if a.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {a.shape}")
        if a.dtype != dtype or not (a.flags.c_contiguous and a.flags.writeable):
            a = a.astype(dtype)
        return a

    @staticmethod
    def stats(v, name, channels):
        """Per-channel statistics (mean, invstd) as float64, or None."""
        return check.channel_vector(v, name, channels)

    @staticmethod
    def check_dtype(dtype, name):
        """Every dtype a layer accepts is computed on the CPU."""

    running_stats = staticmethod(check.running_stats)
    meta = staticmethod(lambda x: x)
    shares_memory = staticmethod(np.may_share_memory)
    put = staticmethod(lambda a: np.array(a))
    host = staticmethod(lambda a: np.array(a))

    @staticmethod
    def full(channels, value, dtype):
        return np.full(channels, value, dtype)

    @staticmethod
    def channel_sum(vectors, dtype):
        """The sum of per-channel vectors, accumulated in float64 in order, in ``dtype``."""
        if len(vectors) == 1:
            return vectors[0].astype(dtype)
        total = 0.0
        for v in vectors:
            total = total + v.astype(np.float64)
        return total.astype(dtype)

    @staticmethod
    def gradients(s_dy, s_dyx, invstd, dtype):
        """``(dweight, dbias) = (s_dyx * invstd, s_dy)`` in ``dtype``."""
        return (s_dyx * invstd).astype(dtype), s_dy.astype(dtype)

    @staticmethod
    def invstd(var, eps):
        return 1.0 / np.sqrt(var + eps)

    # --- a whole forward or backward ----------------------------------------------
    @staticmethod
    def train(x, axis, running_mean, running_var, factor, weight, bias, eps, relu, out):
        """Training forward into ``out``: ``(mean, invstd, updated)``."""
        rm, rv = _wide(running_mean), _wide(running_var)
        result = engine.train(kernel_view(x), engine.layout_of(x.shape, axis, x.itemsize), rm,
                              rv, factor, weight, bias, eps, relu, kernel_view(out))
        _write_back(running_mean, rm, result[2])
        _write_back(running_var, rv, result[2])
        return result

    @staticmethod
    def evaluate(x, axis, mean, var, weight, bias, eps, relu, out, want_mean=True):
        """Forward with the given statistics into ``out``: ``(mean, invstd)``,
        those it normalized with, float64 (``mean`` None unless ``want_mean``)."""
        invstd = engine.evaluate(kernel_view(x), engine.layout_of(x.shape, axis, x.itemsize),
                                 mean, var, weight, bias, eps, relu, kernel_view(out))
        return (check.channel_vector(mean, "mean", mean.shape[0]) if want_mean else None), invstd

    @staticmethod
    def backward(dy, x, axis, mask, mean, invstd, weight, training, out):
        """Input gradient into ``out``; returns ``(dweight, dbias)`` in ``x``'s
        dtype (float32 for a half one)."""
        return engine.backward(kernel_view(dy), kernel_view(x),
                               engine.layout_of(x.shape, axis, x.itemsize), _view(mask), mean,
                               invstd, weight, training, kernel_view(out))

    # --- the pieces, for statistics or corrections computed in between -----------
    @staticmethod
    def moments(x, axis):
        """Per-channel ``(mean, biased variance)`` of ``x``."""
        return engine.moments(kernel_view(x), engine.layout_of(x.shape, axis, x.itemsize))

    @staticmethod
    def grad_sums(dy, x, axis, mask, mean):
        """Per-channel ``sum(g)`` and ``sum(g * (x - mean))``, ``g`` = ``dy`` masked."""
        return engine.grad_sums(kernel_view(x), kernel_view(dy),
                                engine.layout_of(x.shape, axis, x.itemsize), mean,
                                mask=_view(mask))

    @staticmethod
    def grad_input(dy, x, axis, mask, mean, invstd, weight, s_dy, s_dyx, count, out):
        """Input gradient through statistics over ``count`` values per channel
        whose gradient sums are ``s_dy``, ``s_dyx`` (all ranks', say)."""
        layout = engine.layout_of(x.shape, axis, x.itemsize)
        a, b, c = engine.backward_coefficients(s_dy, s_dyx, invstd, weight, count)
        engine.grad_input(kernel_view(dy), kernel_view(x), layout, a, b, c, mean,
                          kernel_view(out), mask=_view(mask))
        return out

    @staticmethod
    def update_running(running_mean, running_var, mean, var, count, factor):
        """The running update with batch statistics over ``count`` values;
        False (nothing changed) if they are not finite."""
        rm, rv = _wide(running_mean), _wide(running_var)
        updated = engine.update_running(rm, rv, mean, var * (count / (count - 1)), factor)
        _write_back(running_mean, rm, updated)
        _write_back(running_var, rv, updated)
        return updated

    @staticmethod
    def renorm(mean, var, running_mean, running_var, weight, bias, rmax, dmax, eps, factor):
        """Batch Renormalization's corrections and moving update (Ioffe 2017):
        ``(w, b, r, d, updated)``; normalizing with ``w`` and ``b`` as weight
        and bias gives ``gamma * (x_hat * r + d) + beta``."""
        std = np.sqrt(var + eps)
        mu = running_mean.astype(np.float64)
        sigma = np.sqrt(running_var.astype(np.float64) + eps)
        r = np.clip(std / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean - mu) / sigma, -dmax, dmax)
        if weight is not None:
            gamma = weight.astype(np.float64)
            w = gamma * r
            b = gamma * d if bias is None else bias.astype(np.float64) + gamma * d
        else:
            w, b = r, d
        updated = bool(np.isfinite(mean).all() and np.isfinite(std).all())
        if updated:
            sigma = sigma + factor * (std - sigma)
            running_mean[...] = mu + factor * (mean - mu)
            running_var[...] = np.maximum(sigma * sigma - eps, 0.0)
        return w, b, r, d, updated

    @staticmethod
    def renorm_grads(r, d, dweight, dbias):
        """gamma's gradient ``r * dweight + d * dbias`` (float64), from that of
        batch norm with weight ``gamma * r``."""
        return r * dweight + d * dbias


BACKEND = CPU()
