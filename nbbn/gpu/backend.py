"""The GPU backend: validate, move arrays to the device, plan and launch the
kernels of ``nbbn.gpu.kernels`` and ``nbbn.gpu.channel_kernels``. The twin
of ``nbbn._engine`` (plans and launches) and of ``nbbn._cpu`` (the backend
interface the layers and ``nbbn.functional`` use, :class:`GPU`).

``numba.cuda`` is imported on the first GPU call, never by ``import nbbn``.
Launch constants live here, read at call time (tests patch them small for
the simulator). Results depend on the shape and on ``LANES`` and
``ELEMENTS_PER_LANE``, never on ``THREADS_PER_BLOCK`` or the device.
"""
import math
import types
from typing import NamedTuple

import numpy as np

from .. import _validation as check

#: Threads of every block (results do not depend on it).
THREADS_PER_BLOCK = 256
#: Logical lanes of a block's reduction; a power of two, at most
#: ``nbbn.gpu.kernels.MAX_LANES``. Each thread plays ``LANES / THREADS_PER_BLOCK`` lanes.
LANES = 256
#: Elements one lane reduces into a partial state.
ELEMENTS_PER_LANE = 16

_cuda = None


def cuda():
    """``numba.cuda``, imported on first use.

    Raises
    ------
    RuntimeError
        If numba has no CUDA target, or neither a GPU nor the simulator
        (``NUMBA_ENABLE_CUDASIM=1``) is available.
    """
    global _cuda
    if _cuda is None:
        try:
            from numba import cuda as module
        except ImportError as e:
            raise RuntimeError("device='cuda' needs numba's CUDA target: "
                               "pip install 'nbbn[cuda]'") from e
        if not module.is_available():
            reason = " ".join(str(module.cuda_error() or "no device found").split())
            raise RuntimeError(
                "device='cuda' was requested but no CUDA GPU is available "
                f"(numba.cuda.is_available() is False: {reason}); set NUMBA_ENABLE_CUDASIM=1 "
                "before numba is imported to run on numba's CUDA simulator")
        _cuda = module
    return _cuda


def _kernels():
    cuda()
    from . import kernels as cuda_kernels
    return cuda_kernels


def _channels():
    cuda()
    from . import channel_kernels as cuda_channel_kernels
    return cuda_channel_kernels


is_device_array = check.is_device_array


def _device_view(a):
    """A Numba device array over the same memory as device array ``a``."""
    return a if getattr(a, "__cuda_ndarray__", False) else cuda().as_cuda_array(a)


def as_input(x, name="x"):
    """``x`` as a float32/float64 C-contiguous device array; NumPy input
    (anything not on the device) is validated as on the CPU and copied."""
    if not is_device_array(x):
        return cuda().to_device(check.as_array(x, name))
    a = _device_view(x)
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous on the device, got shape {a.shape} "
                         f"with strides {a.strides}")
    return a


def to_device(a):
    """``a`` on the device (a copy of a host array; device arrays as they are)."""
    return _device_view(a) if is_device_array(a) else cuda().to_device(np.ascontiguousarray(a))


def to_host(a):
    """A NumPy copy of ``a``, wherever it is."""
    return _device_view(a).copy_to_host() if is_device_array(a) else np.array(a)


def astype(a, dtype):
    """Device array ``a`` (1-D) in ``dtype`` (``a`` itself if it has it)."""
    if a.dtype == dtype:
        return a
    out = cuda().device_array(a.shape, dtype)
    _channels().cast[_grid(a.shape[0]), THREADS_PER_BLOCK](a, out)
    return out


def shares_memory(a, b):
    """Whether arrays ``a`` and ``b`` overlap: both NumPy or both on the device."""
    if is_device_array(a) != is_device_array(b):
        return False
    if not is_device_array(a):
        return np.may_share_memory(a, b)
    a, b = _device_view(a), _device_view(b)
    if not hasattr(a, "__cuda_array_interface__"):  # the simulator wraps NumPy arrays
        return np.may_share_memory(a._ary, b._ary)
    lo_a = a.__cuda_array_interface__["data"][0]
    lo_b = b.__cuda_array_interface__["data"][0]
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def meta(x):
    """Shape facts of a NumPy or device array for the checks of
    ``nbbn._validation`` (the simulator's shapes take no negative index)."""
    return types.SimpleNamespace(ndim=x.ndim, shape=tuple(x.shape), size=x.size)


def _grid(n):
    return max(1, -(-n // THREADS_PER_BLOCK))


def _vector(v, name, channels):
    """A per-channel (C,) device vector (NumPy input: float64 copy), or None."""
    if v is None:
        return None
    if not is_device_array(v):
        return cuda().to_device(check.channel_vector(v, name, channels))
    a = _device_view(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
    if a.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {a.shape}")
    return a


def _running_stats(mean, var, channels):
    """Validate running statistics (device or NumPy arrays, updated in place)."""
    if (mean is None) != (var is None):
        raise ValueError("running_mean and running_var must be given together")
    for v, name in ((mean, "running_mean"), (var, "running_var")):
        if v is None:
            continue
        a = _device_view(v) if is_device_array(v) else v
        if not isinstance(a, np.ndarray) and not is_device_array(a) or \
                a.dtype.newbyteorder("=") not in check.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32 or float64 NumPy or device array, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {a.shape}")
        if isinstance(a, np.ndarray) and not (a.flags.writeable and a.dtype.isnative):
            raise ValueError(f"{name} must be writable and in native byte order "
                             "(it is updated in place)")


def _output(out, x):
    """``out`` checked against ``x`` (a device array like it), or a new one."""
    if out is None:
        return cuda().device_array(x.shape, x.dtype)
    if not is_device_array(out):
        raise TypeError(f"out must be a device array when the input is on the GPU, "
                        f"got {type(out).__name__}")
    o = _device_view(out)
    _check_like(o, x, "out")
    if not o.is_c_contiguous():
        raise ValueError("out must be C-contiguous")
    return o


def _check_like(a, x, name):
    if a.shape != x.shape:
        raise ValueError(f"{name} must have shape {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have dtype {x.dtype}, got {a.dtype}")


class Plan(NamedTuple):
    """How an input is viewed and cut into blocks (see ``nbbn.gpu.kernels``).

    ``step`` is the chunk of a plane (planes) or the rows of a chunk (rows);
    ``states`` the partial states per channel; ``merge`` the
    ``(stride, size, total)`` that give each state's count.
    """

    view: tuple
    planes: bool
    channels: int
    inner: int
    count: int
    lanes: int
    step: int
    blocks: int
    states: int
    merge: tuple


def plan_of(shape, axis):
    """The :class:`Plan` of an input of ``shape`` with channels on ``axis``."""
    lanes = LANES
    if lanes & (lanes - 1) or not 1 <= lanes <= _kernels().MAX_LANES:
        raise ValueError(f"LANES must be a power of two <= {_kernels().MAX_LANES}, got {lanes}")
    channels = shape[axis]
    count = math.prod(shape) // channels
    inner = math.prod(shape[2:]) if axis == 1 else 1
    if axis == 1 and len(shape) > 2 and inner >= lanes:
        chunk = lanes * ELEMENTS_PER_LANE
        k = -(-inner // chunk)
        return Plan((shape[0], channels, inner), True, channels, inner, count, lanes, chunk,
                    shape[0] * channels * k, shape[0] * k, (1, chunk, inner))
    rows = shape[0] if axis == 1 else count
    width = channels * inner
    group = max(1, lanes // width)
    rows_per_chunk = ELEMENTS_PER_LANE * group
    chunks = -(-rows // rows_per_chunk)
    tiles = -(-width // min(width, lanes))
    return Plan((rows, width), False, channels, inner, count, lanes, rows_per_chunk,
                tiles * chunks, chunks * inner, (inner, rows_per_chunk, rows))


def moments(x, plan):
    """Per-channel mean and biased variance (float64 device vectors) of ``x``."""
    cu, k, tpb = cuda(), _kernels(), THREADS_PER_BLOCK
    v = x.reshape(plan.view)
    means = cu.device_array((plan.channels, plan.states))
    m2s = cu.device_array((plan.channels, plan.states))
    if plan.planes:
        k.plane_moments[plan.blocks, tpb](v, plan.step, plan.lanes, means, m2s)
    else:
        k.row_moments[plan.blocks, tpb](v, plan.step, plan.inner, plan.lanes, means, m2s)
    mean, var = cu.device_array(plan.channels), cu.device_array(plan.channels)
    k.merge_moments[plan.channels, tpb](means, m2s, *plan.merge, plan.lanes, mean, var)
    return mean, var


def _mask(mask, like, plan):
    """``(mask, masked)`` kernel arguments: without a mask, ``like`` stands in
    (never read)."""
    return (like, False) if mask is None else (mask.reshape(plan.view), True)


def affine(x, plan, mean, scale, shift, out, *, relu=False, mask=None):
    """``out = (x - mean) * scale + shift`` per channel; then ``max(out, 0)``
    with ``relu``, and 0 where ``mask > 0`` is false with a ``mask``."""
    k, tpb = _kernels(), THREADS_PER_BLOCK
    v, o = x.reshape(plan.view), out.reshape(plan.view)
    m = _mask(mask, v, plan)
    if plan.planes:
        k.plane_affine[plan.blocks, tpb](v, mean, scale, shift, plan.step, bool(relu), *m, o)
    else:
        k.row_affine[plan.blocks, tpb](v, mean, scale, shift, plan.step, plan.inner,
                                       plan.lanes, bool(relu), *m, o)
    return out


def grad_sums(x, dy, plan, mean, *, mask=None):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` (float64 device
    vectors), ``g`` being ``dy``, or 0 where ``mask > 0`` is false."""
    cu, k, tpb = cuda(), _kernels(), THREADS_PER_BLOCK
    v, g = x.reshape(plan.view), dy.reshape(plan.view)
    m = _mask(mask, v, plan)
    s_dy = cu.device_array((plan.channels, plan.states))
    s_dyx = cu.device_array((plan.channels, plan.states))
    if plan.planes:
        k.plane_grad_sums[plan.blocks, tpb](v, g, *m, mean, plan.step, plan.lanes, s_dy, s_dyx)
    else:
        k.row_grad_sums[plan.blocks, tpb](v, g, *m, mean, plan.step, plan.inner, plan.lanes,
                                          s_dy, s_dyx)
    a, b = cu.device_array(plan.channels), cu.device_array(plan.channels)
    k.merge_sums[plan.channels, tpb](s_dy, s_dyx, plan.lanes, a, b)
    return a, b


def grad_input(dy, x, plan, a, b, c, mean, out, *, mask=None):
    """``out = g * a + (x - mean) * b + c`` per channel, ``g`` as in :func:`grad_sums`."""
    k, tpb = _kernels(), THREADS_PER_BLOCK
    g, v, o = dy.reshape(plan.view), x.reshape(plan.view), out.reshape(plan.view)
    m = _mask(mask, v, plan)
    if plan.planes:
        k.plane_grad_input[plan.blocks, tpb](g, v, *m, a, b, c, mean, plan.step, o)
    else:
        k.row_grad_input[plan.blocks, tpb](g, v, *m, a, b, c, mean, plan.step, plan.inner,
                                           plan.lanes, o)
    return out


def _cpu_parameter(value, name, channels, dtype):
    from .._cpu import CPU
    return CPU.parameter(value, name, channels, dtype)


class GPU:
    """Batch normalization on device arrays: the GPU twin of ``nbbn._cpu.CPU``,
    method for method. NumPy inputs are copied to the device; outputs and
    per-channel statistics are Numba device arrays (float64 statistics)."""

    name = "cuda"
    check_available = staticmethod(cuda)

    # --- arrays ---------------------------------------------------------------
    input = staticmethod(as_input)

    @staticmethod
    def like(a, x, name):
        a = as_input(a, name)
        _check_like(a, x, name)
        return a

    @staticmethod
    def output(out, x):
        return _output(out, x)

    @staticmethod
    def vector(v, name, channels):
        return _vector(v, name, channels)

    @staticmethod
    def parameter(value, name, channels, dtype):
        if not is_device_array(value):
            return cuda().to_device(_cpu_parameter(value, name, channels, dtype))
        a = _vector(value, name, channels)
        return a if a.dtype == dtype else astype(a, dtype)

    @staticmethod
    def stats(v, name, channels):
        v = _vector(v, name, channels)
        return None if v is None else astype(v, np.float64)

    running_stats = staticmethod(_running_stats)
    meta = staticmethod(meta)
    shares_memory = staticmethod(shares_memory)
    put = staticmethod(to_device)
    host = staticmethod(to_host)

    @staticmethod
    def full(channels, value, dtype):
        return cuda().to_device(np.full(channels, value, dtype))

    @staticmethod
    def channel_sum(vectors, dtype):
        """The sum of per-channel device vectors, accumulated in float64 in order."""
        if len(vectors) == 1:
            return astype(vectors[0], dtype)
        total = cuda().to_device(np.zeros(vectors[0].shape[0]))
        for v in vectors:
            _channels().accumulate[_grid(v.shape[0]), THREADS_PER_BLOCK](v, total)
        return astype(total, dtype)

    @staticmethod
    def invstd(var, eps):
        return to_device(1.0 / np.sqrt(to_host(var) + eps))

    @staticmethod
    def gradients(s_dy, s_dyx, invstd, dtype):
        s_dy = to_host(s_dy)
        return to_device((to_host(s_dyx) * to_host(invstd)).astype(dtype)), to_device(
            s_dy.astype(dtype))

    # --- a whole forward or backward ----------------------------------------------
    @classmethod
    def train(cls, x, axis, running_mean, running_var, factor, weight, bias, eps, relu, out):
        plan = plan_of(tuple(x.shape), axis)
        mean, var = moments(x, plan)
        updated = running_mean is not None and cls.update_running(
            running_mean, running_var, mean, var, plan.count, factor)
        return mean, var, cls.evaluate(x, axis, mean, var, weight, bias, eps, relu, out), updated

    @staticmethod
    def evaluate(x, axis, mean, var, weight, bias, eps, relu, out):
        plan = plan_of(tuple(x.shape), axis)
        channels = plan.channels
        mean, var = to_device(mean), to_device(var)
        mean64, invstd, scale, shift = (cuda().device_array(channels) for _ in range(4))
        _channels().coefficients[_grid(channels), THREADS_PER_BLOCK](
            mean, var, mean if weight is None else weight, mean if bias is None else bias,
            weight is not None, bias is not None, eps, mean64, invstd, scale, shift)
        affine(x, plan, mean64, scale, shift, out, relu=relu)
        return invstd

    @staticmethod
    def backward(dy, x, axis, mask, mean, invstd, weight, training, out):
        plan = plan_of(tuple(x.shape), axis)
        channels = plan.channels
        s_dy, s_dyx = grad_sums(x, dy, plan, mean, mask=mask)
        a, b, c = (cuda().device_array(channels) for _ in range(3))
        dweight = cuda().device_array(channels, x.dtype)
        dbias = cuda().device_array(channels, x.dtype)
        _channels().backward_coefficients[_grid(channels), THREADS_PER_BLOCK](
            s_dy, s_dyx, invstd, invstd if weight is None else weight, weight is not None,
            float(plan.count), bool(training), a, b, c, dweight, dbias)
        if training:
            grad_input(dy, x, plan, a, b, c, mean, out, mask=mask)
        else:
            affine(dy, plan, b, a, b, out, mask=mask)  # b is 0 here: out = dy * a
        return dweight, dbias

    # --- the pieces ------------------------------------------------------------------
    @staticmethod
    def moments(x, axis):
        return moments(x, plan_of(tuple(x.shape), axis))

    @staticmethod
    def grad_sums(dy, x, axis, mask, mean):
        return grad_sums(x, dy, plan_of(tuple(x.shape), axis), mean, mask=mask)

    @staticmethod
    def grad_input(dy, x, axis, mask, mean, invstd, weight, s_dy, s_dyx, count, out):
        plan = plan_of(tuple(x.shape), axis)
        channels = plan.channels
        a, b, c = (cuda().device_array(channels) for _ in range(3))
        dweight, dbias = cuda().device_array(channels), cuda().device_array(channels)
        _channels().backward_coefficients[_grid(channels), THREADS_PER_BLOCK](
            s_dy, s_dyx, invstd, invstd if weight is None else weight, weight is not None,
            float(count), True, a, b, c, dweight, dbias)
        return grad_input(dy, x, plan, a, b, c, mean, out, mask=mask)

    @staticmethod
    def update_running(running_mean, running_var, mean, var, count, factor):
        """Update the running statistics on the device unless the batch's are
        not finite; NumPy running statistics are updated too (copied back)."""
        stats = (to_device(running_mean), to_device(running_var))
        ok = cuda().device_array(1, np.int32)
        _channels().update_running[1, THREADS_PER_BLOCK](*stats, mean, var, count / (count - 1),
                                                        factor, LANES, ok)
        if not ok.copy_to_host()[0]:
            return False
        for host, dev in zip((running_mean, running_var), stats):
            if not is_device_array(host):
                host[...] = dev.copy_to_host()
        return True

    @staticmethod
    def renorm(mean, var, running_mean, running_var, weight, bias, rmax, dmax, eps, factor):
        channels = mean.shape[0]
        cu, k, tpb = cuda(), _channels(), THREADS_PER_BLOCK
        invstd, r, d, w, scale, shift = (cu.device_array(channels) for _ in range(6))
        has_affine = weight is not None
        if has_affine and bias is None:
            bias = cu.to_device(np.zeros(channels))
        k.renorm_coefficients[_grid(channels), tpb](
            mean, var, running_mean, running_var, weight if has_affine else mean,
            bias if has_affine else mean, has_affine, eps, 1.0 / rmax, rmax, dmax,
            invstd, r, d, w, scale, shift)
        ok = cu.device_array(1, np.int32)
        k.renorm_update[1, tpb](running_mean, running_var, mean, var, eps, factor, LANES, ok)
        return w, shift, r, d, bool(ok.copy_to_host()[0])

    @staticmethod
    def renorm_grads(r, d, dweight, dbias):
        out = cuda().device_array(r.shape[0])
        _channels().renorm_grads[_grid(r.shape[0]), THREADS_PER_BLOCK](r, d, dweight, dbias, out)
        return out


BACKEND = GPU()
