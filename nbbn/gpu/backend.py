"""The GPU backend: validate, move arrays to the device, plan and launch the
kernels of ``nbbn.gpu.kernels`` and ``nbbn.gpu.channel_kernels``. The twin
of ``nbbn._engine`` (plans and launches) and of ``nbbn._cpu`` (the backend
interface the layers and ``nbbn.functional`` use, :class:`GPU`).

``numba.cuda`` is imported on the first GPU call, never by ``import nbbn``.
Launch constants live here, read at call time (tests patch them small for
the simulator). Results depend on the shape and on ``LANES``,
``ELEMENTS_PER_LANE`` and ``ROW_TILE``, never on ``THREADS_PER_BLOCK`` or
the device.

Steady-state calls allocate no device memory and never wait for the
device: outputs come from a :class:`~nbbn.gpu.memory.Pool`, scratch from a
per-thread :class:`Workspace` of each shape, and the running update, its
finiteness check and ``num_batches_tracked`` stay on the device
(:class:`Counter`); the host reads them only when asked (docs/gpu.md).
"""
import importlib
import importlib.util
import math
import threading
import types
import weakref
from typing import NamedTuple

import numpy as np

from .. import _validation as check

#: Threads of every block (results do not depend on it).
THREADS_PER_BLOCK = 256
#: Logical lanes of a block's reduction; a power of two, at most
#: ``nbbn.gpu.kernels.MAX_LANES``. Each thread plays ``LANES / THREADS_PER_BLOCK`` lanes.
LANES = 256
#: Values one lane takes in a part (about; the parts of a channel are even).
ELEMENTS_PER_LANE = 32
#: Columns of a block of the rows layout (at most ``LANES``): a warp's worth,
#: so that a warp reads one row's consecutive columns. Planes of at least
#: ``min(ROW_TILE, LANES)`` values take the channel layout instead.
ROW_TILE = 32

_cuda = None
_pool = None
_simulated = False
#: numba-cuda's module that names ``np.row_stack`` (see :func:`_import_numba_cuda`).
ARRAYOBJ = "numba.cuda.np.arrayobj"


def _import_numba_cuda():
    """``numba.cuda``, made to compile under NumPy 2.5 if it can be.

    numba-cuda (0.30.4, the newest) registers its ``np.vstack`` overload for
    ``np.row_stack`` too when it first compiles a kernel; NumPy 2.5 removed
    ``row_stack``, so that first compile raises ``AttributeError`` (numba-cuda
    issue 907). Where NumPy has no ``row_stack`` and ``numba.cuda`` is
    numba-cuda (it has :data:`ARRAYOBJ`; numba's built-in target has not, nor
    needs it), that module is imported now, with ``numpy.row_stack`` set to
    ``numpy.vstack`` for the import only. If it still fails: a RuntimeError
    naming the fix.
    """
    from numba import cuda as module
    if (hasattr(np, "row_stack") or _is_simulator()
            or importlib.util.find_spec(ARRAYOBJ.rpartition(".")[0]) is None):
        return module
    np.row_stack = np.vstack
    try:
        importlib.import_module(ARRAYOBJ)
    except Exception as e:
        raise RuntimeError(
            f"numba's CUDA target fails to load under NumPy {np.__version__} ({e!r}); "
            "install a NumPy it supports: pip install 'numpy<2.5' (or pip install "
            "'nbbn[cuda]', which does)") from e
    finally:
        del np.row_stack
    return module


def _is_simulator():
    """Whether ``numba.cuda`` is numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba.cuda.cudadrv import devicearray
    return ".simulator" in devicearray.__name__


def cuda():
    """``numba.cuda``, imported on first use.

    Raises
    ------
    RuntimeError
        If numba has no CUDA target, or it cannot load under this NumPy, or
        neither a GPU nor the simulator (``NUMBA_ENABLE_CUDASIM=1``) is available.
    """
    global _cuda, _pool, _simulated
    if _cuda is None:
        try:
            module = _import_numba_cuda()
        except ImportError as e:
            raise RuntimeError("device='cuda' needs numba's CUDA target: "
                               "pip install 'nbbn[cuda]'") from e
        if not module.is_available():
            reason = " ".join(str(module.cuda_error() or "no device found").split())
            raise RuntimeError(
                "device='cuda' was requested but no CUDA GPU is available "
                f"(numba.cuda.is_available() is False: {reason}); set NUMBA_ENABLE_CUDASIM=1 "
                "before numba is imported to run on numba's CUDA simulator")
        from .memory import Pool
        _simulated = _is_simulator()
        if _simulated:
            from .simulator import make_shared_arrays_safe
            make_shared_arrays_safe()
        _pool = Pool(module, _simulated)
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


_contexts = {}  # id -> context: kept, so that an id names one context


def _device():
    """A key of the current device's context (numba's simulator has one)."""
    if _simulated:
        return 0
    context = cuda().current_context()
    _contexts.setdefault(id(context), context)
    return id(context)


def take(shape, dtype):
    """A device array from the pool (see ``nbbn.gpu.memory``)."""
    cuda()
    return _pool.take(shape, dtype, _device())


def empty_cache():
    """Free the device memory nbbn keeps for reuse: the pool's free arrays and
    this thread's workspaces. Later calls allocate them again."""
    if _pool is not None:
        _pool.clear()
    _local.__dict__.clear()


is_device_array = check.is_device_array


def _device_view(a):
    """A Numba device array over the same memory as device array ``a``."""
    return a if getattr(a, "__cuda_ndarray__", False) else cuda().as_cuda_array(a)


def _upload(a):
    """A device copy (from the pool) of NumPy array ``a``."""
    a = np.ascontiguousarray(a)
    if not a.size:
        return cuda().to_device(a)
    d = take(a.shape, a.dtype)
    d.copy_to_device(a)
    return d


def check_dtype(dtype, name):
    """Refuse the half types (float16, bfloat16), which the CPU path takes
    and this one does not compute in yet, naming the dtype and the device."""
    if check.is_half(dtype):
        raise TypeError(f"{name} is {dtype.name}, which the GPU path (device='cuda') does not "
                        "take: it computes in float32 or float64; use those on the GPU, or "
                        "the CPU for half precision")


def as_input(x, name="x"):
    """``x`` as a float32/float64 C-contiguous device array; NumPy input
    (anything not on the device) is validated as on the CPU and copied."""
    if not is_device_array(x):
        dtype = np.asarray(x).dtype
        check_dtype(dtype, f"{name}'s dtype")
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")
        return _upload(check.as_array(x, name))
    a = _device_view(x)
    check_dtype(a.dtype, f"{name}'s dtype")
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


def _grid(n):
    return max(1, -(-n // THREADS_PER_BLOCK))


_specialized = {}  # (kernel, kinds of the arguments) -> kernel.specialize(*arguments)
_configured = {}  # (kernel, grid, threads) -> the configured kernel, kernel[grid, threads]


def _kind(a):
    """What decides numba's type of a kernel argument, cheaply: an array's
    dtype, shape and strides (its layout follows), or a scalar's Python type."""
    strides = getattr(a, "strides", None)
    return type(a) if strides is None else (a.dtype, a.shape, strides)


def _launch(kernel, grid, *args):
    """Launch ``kernel`` on ``grid`` blocks of ``THREADS_PER_BLOCK`` threads.

    The kernel is specialized for its arguments' types once (numba's
    ``specialize``: later launches skip typing each argument) and configured
    once per grid."""
    key = (kernel, *map(_kind, args))
    specialized = _specialized.get(key)
    if specialized is None:
        specialized = _specialized[key] = kernel.specialize(*args)
    key = (specialized, grid, THREADS_PER_BLOCK)
    launcher = _configured.get(key)
    if launcher is None:
        launcher = specialized[grid, THREADS_PER_BLOCK]
        if launcher is not specialized:  # (numba's simulator configures the kernel itself)
            _configured[key] = launcher
    launcher(*args)


def astype(a, dtype):
    """Device array ``a`` (1-D) in ``dtype`` (``a`` itself if it has it)."""
    if a.dtype == dtype:
        return a
    out = take(a.shape, dtype)
    _launch(_channels().cast, _grid(a.shape[0]), a, out)
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


def _vector(v, name, channels):
    """A per-channel (C,) device vector (NumPy input: float64 copy), or None."""
    if v is None:
        return None
    if not is_device_array(v):
        return _upload(check.channel_vector(v, name, channels))
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
        if isinstance(getattr(a, "dtype", None), np.dtype):
            check_dtype(a.dtype, f"{name}'s dtype")
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
        return take(x.shape, x.dtype)
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
    """How an input is cut into blocks: ``geo`` is the kernels' geometry
    (see ``nbbn.gpu.kernels``), ``columns`` and ``parts`` the shape of the
    partial states, ``tiles * parts`` the blocks."""

    geo: tuple
    channels: int
    count: int  # values per channel
    tiles: int
    parts: int
    columns: int

    @property
    def blocks(self):
        return self.tiles * self.parts


def plan_of(shape, axis):
    """The :class:`Plan` of an input of ``shape`` with channels on ``axis``."""
    lanes = LANES
    if lanes & (lanes - 1) or not 1 <= lanes <= _kernels().MAX_LANES:
        raise ValueError(f"LANES must be a power of two <= {_kernels().MAX_LANES}, got {lanes}")
    tile = min(ROW_TILE, lanes)
    channels = shape[axis]
    count = math.prod(shape) // channels
    inner = math.prod(shape[2:]) if axis == 1 else 1
    if axis == 1 and len(shape) > 2 and inner >= tile:  # the channel layout
        extent = shape[0] * inner
        parts = -(-extent // (lanes * ELEMENTS_PER_LANE))
        chunk = -(-extent // parts)
        parts = -(-extent // chunk)
        geo = (1, channels, inner, channels * inner, extent, 1, lanes, chunk, parts, 1, lanes)
        return Plan(geo, channels, count, channels, parts, channels)
    rows, width = count // inner, channels * inner
    span = width if width <= tile else tile // inner * inner
    group = lanes // span
    chunk = group * ELEMENTS_PER_LANE
    if -(-rows // chunk) > lanes:  # at most LANES parts (a short merge), longer runs
        per_part = -(-rows // lanes)
        chunk = -(-per_part // group) * group
    parts = -(-rows // chunk)
    geo = (0, channels, inner, width, rows, span, group, chunk, parts, inner, lanes)
    return Plan(geo, channels, count, -(-width // span), parts, width)


class Workspace:
    """The scratch of the launches on one input shape, kept per thread and
    device: partial states (their rows padded to 128 bytes, so that no two
    columns share a cache line), tickets (zero between launches), gradient
    sums, and copies of NumPy running statistics."""

    def __init__(self, plan):
        cu = cuda()
        self.plan = plan
        self.states = cu.device_array((2, plan.columns, -(-plan.parts // 16) * 16))
        self.tickets = cu.to_device(np.zeros(plan.tiles + 1, np.int32))
        self.sums = cu.device_array((2, plan.channels))
        self.counts = cu.to_device(np.zeros(2, np.int64))  # NumPy running statistics' updates
        self.updates = 0  # counts[0] when last read
        self.staged, self.staged_rows = {}, {}

    def stage(self, mean, var):
        """Device copies of NumPy running statistics (float32 or float64; in
        float64 if they differ, which rounds nothing back)."""
        dtype = np.result_type(mean, var)
        if dtype not in self.staged:
            self.staged[dtype] = cuda().device_array((2, self.plan.channels), dtype)
            self.staged_rows[dtype] = (self.staged[dtype][0], self.staged[dtype][1])
        staged = self.staged[dtype]
        staged.copy_to_device(np.stack([mean, var]).astype(dtype, copy=False))
        return staged


_local = threading.local()


def workspace(shape, axis):
    """This thread's :class:`Workspace` for inputs of ``shape`` on the current device."""
    key = (_device(), shape, axis, LANES, ELEMENTS_PER_LANE, ROW_TILE)
    spaces = _local.__dict__
    ws = spaces.get(key)
    if ws is None:
        ws = spaces[key] = Workspace(plan_of(shape, axis))
    return ws


def _flat(a):
    return _pool.flat(a)


def _rows(a):
    return _pool.rows(a)


_pending = weakref.WeakSet()  # counters with batches the host has not read yet


class Counter:
    """``num_batches_tracked`` of a layer on the GPU: the running updates and
    the skipped (non-finite) batches, two int64 on the device, counted by the
    kernels that update the running statistics. Reading it (:meth:`read`)
    copies them to the host and warns about the batches skipped since the
    last read; nothing else waits for the device."""

    def __init__(self, value=0):
        self.counts = cuda().to_device(np.array([value, 0], np.int64))
        self._value, self._skipped, self._what = value, 0, "running statistics"

    def factor(self, momentum):
        """The kernels' ``(momentum, counts)``; momentum -1: cumulative."""
        return Factor(-1.0 if momentum is None else float(momentum), self.counts)

    def record(self, updated, what):
        """A launch may have counted a batch (``updated`` is None): it is read later."""
        self._what = what
        _pending.add(self)
        return True

    def read(self):
        """The number of updates; warns if batches were skipped since the last read."""
        if self in _pending:
            _pending.discard(self)
            updates, skipped = (int(v) for v in self.counts.copy_to_host())
            self._value = updates
            if skipped > self._skipped:
                # stacklevel 3: the reader's caller
                check.warn_not_finite(3, self._what, skipped - self._skipped)
            self._skipped = skipped
        return self._value


class Factor(NamedTuple):
    """The weight of a batch in the running statistics, worked out on the device."""

    momentum: float
    counts: object


_functional = {}  # device -> Counter of nbbn.functional's device running statistics


def _factor(factor):
    """``(momentum, counts, counter)`` for the kernels from a layer's
    :class:`Factor` (``counter`` None: the layer records) or a float (the
    functional API's momentum: its counter records)."""
    if isinstance(factor, Factor):
        return factor.momentum, factor.counts, None
    device = _device()
    if device not in _functional:
        _functional[device] = Counter()
    counter = _functional[device]
    return float(factor), counter.counts, counter


def sync():
    """Wait for the GPU, then warn about every batch whose statistics were not
    finite since the device was last read (layers' and ``nbbn.functional``'s)."""
    cuda().synchronize()
    for counter in list(_pending):
        counter.read()


def _cpu_parameter(value, name, channels, dtype):
    from .._cpu import CPU
    return CPU.parameter(value, name, channels, dtype)


class GPU:
    """Batch normalization on device arrays: the GPU twin of ``nbbn._cpu.CPU``,
    method for method. NumPy inputs are copied to the device; outputs and
    per-channel statistics are Numba device arrays (float64 statistics).
    A training forward is two launches, an evaluation forward one, a
    backward two (``nbbn.gpu.kernels``)."""

    name = "cuda"
    check_available = staticmethod(cuda)
    counter = Counter

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

    check_dtype = staticmethod(check_dtype)
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
        total = take(vectors[0].shape, np.float64)
        for i, v in enumerate(vectors):
            _launch(_channels().accumulate, _grid(v.shape[0]), v, total, i == 0)
        return astype(total, dtype)

    @staticmethod
    def invstd(var, eps):
        out = take(var.shape, np.float64)
        _launch(_channels().invstd, _grid(var.shape[0]), var, eps, out)
        return out

    @staticmethod
    def gradients(s_dy, s_dyx, invstd, dtype):
        out = take((2, invstd.shape[0]), dtype)
        _launch(_channels().gradients, _grid(invstd.shape[0]), s_dy, s_dyx, invstd, out)
        return tuple(_rows(out))

    # --- a whole forward or backward ----------------------------------------------
    @staticmethod
    def train(x, axis, running_mean, running_var, factor, weight, bias, eps, relu, out):
        """Training forward into ``out``: ``(mean, invstd, updated)``.
        ``updated`` is None where the device counted it (device running
        statistics), a bool where NumPy running statistics were copied back."""
        ws = workspace(tuple(x.shape), axis)
        plan = ws.plan
        stats = take((3, plan.channels), np.float64)
        mean, var, invstd = _rows(stats)
        rm = rv = mean
        momentum, counts, counter = 0.0, ws.counts, None
        track = running_mean is not None
        host_stats = track and not is_device_array(running_mean)
        if track:
            momentum, counts, counter = _factor(factor)
            if host_stats:
                counts, staged = ws.counts, ws.stage(running_mean, running_var)
                rm, rv = ws.staged_rows[staged.dtype]
            else:
                rm, rv = _device_view(running_mean), _device_view(running_var)
        x1, k = _flat(x), _kernels()
        _launch(k.moments, plan.blocks, x1, plan.geo, ws.states, ws.tickets, stats, rm, rv,
                track, momentum, plan.count / (plan.count - 1), counts)
        _normalize(x1, plan, mean, var, weight, bias, eps, relu, stats, _flat(out))
        updated = None
        if host_stats:
            updates = int(counts.copy_to_host()[0])
            updated, ws.updates = updates > ws.updates, updates
            running_mean[...], running_var[...] = staged.copy_to_host()
        elif counter is not None:
            counter.record(None, "running statistics")
        return mean, invstd, updated if track else False

    @staticmethod
    def evaluate(x, axis, mean, var, weight, bias, eps, relu, out, want_mean=True):
        """Forward with the given statistics into ``out``: ``(mean, invstd)``,
        those it normalized with, float64 (the mean comes with the
        coefficients: ``want_mean`` changes nothing here)."""
        ws = workspace(tuple(x.shape), axis)
        plan = ws.plan
        if not is_device_array(mean):
            mean, var = ws.staged_rows[ws.stage(mean, var).dtype]
        stats = take((3, plan.channels), np.float64)
        _normalize(_flat(x), plan, mean, var, weight, bias, eps, relu, stats, _flat(out))
        mean64, _, invstd = _rows(stats)
        return mean64, invstd

    @staticmethod
    def backward(dy, x, axis, mask, mean, invstd, weight, training, out):
        ws = workspace(tuple(x.shape), axis)
        plan = ws.plan
        grads = take((2, plan.channels), x.dtype)
        x1 = _flat(x)
        _grad_sums(x1, _flat(dy), mask, mean, plan, ws, ws.sums, invstd, grads)
        _grad_input(_flat(dy), x1, mask, mean, invstd, weight, ws.sums, plan.count, training,
                    plan, _flat(out))
        return tuple(_rows(grads))

    # --- the pieces ------------------------------------------------------------------
    @staticmethod
    def moments(x, axis):
        ws = workspace(tuple(x.shape), axis)
        plan = ws.plan
        stats = take((3, plan.channels), np.float64)
        mean, var, _ = _rows(stats)
        _launch(_kernels().moments, plan.blocks, _flat(x), plan.geo, ws.states, ws.tickets,
                stats, mean, var, False, 0.0, 1.0, ws.counts)
        return mean, var

    @staticmethod
    def grad_sums(dy, x, axis, mask, mean):
        ws = workspace(tuple(x.shape), axis)
        sums = take((2, ws.plan.channels), np.float64)
        _grad_sums(_flat(x), _flat(dy), mask, mean, ws.plan, ws, sums, None, None)
        return tuple(_rows(sums))

    @staticmethod
    def grad_input(dy, x, axis, mask, mean, invstd, weight, s_dy, s_dyx, count, out):
        ws = workspace(tuple(x.shape), axis)
        ws.sums[0].copy_to_device(s_dy)
        ws.sums[1].copy_to_device(s_dyx)
        _grad_input(_flat(dy), _flat(x), mask, mean, invstd, weight, ws.sums, count, True,
                    ws.plan, _flat(out))
        return out

    @staticmethod
    def update_running(running_mean, running_var, mean, var, count, factor):
        """The running update on the device (one block), unless the batch
        statistics are not finite; counted on the device (returns None)."""
        momentum, counts, counter = _factor(factor)
        _launch(_kernels().running_update, 1, running_mean, running_var, mean, var,
                count / (count - 1), momentum, counts, LANES)
        if counter is not None:
            counter.record(None, "running statistics")

    @staticmethod
    def renorm(mean, var, running_mean, running_var, weight, bias, rmax, dmax, eps, factor):
        momentum, counts, counter = _factor(factor)
        out = take((4, mean.shape[0]), np.float64)
        _launch(_kernels().renorm, 1, mean, var, running_mean, running_var,
                mean if weight is None else weight, mean if bias is None else bias,
                weight is not None, bias is not None, eps, 1.0 / rmax, rmax, dmax, momentum,
                counts, LANES, out)
        if counter is not None:
            counter.record(None, "moving statistics")
        r, d, w, shift = _rows(out)
        return w, shift, r, d, None

    @staticmethod
    def renorm_grads(r, d, dweight, dbias):
        out = take(r.shape, np.float64)
        _launch(_channels().renorm_grads, _grid(r.shape[0]), r, d, dweight, dbias, out)
        return out


def _normalize(x1, plan, mean, var, weight, bias, eps, relu, stats, out1):
    _launch(_kernels().normalize, plan.blocks, x1, plan.geo, mean, var,
            mean if weight is None else weight, mean if bias is None else bias,
            weight is not None, bias is not None, bool(relu), eps, stats, out1)


def _mask(mask, like):
    """``(mask, masked)`` kernel arguments: without a mask, ``like`` stands in
    (never read)."""
    return (like, False) if mask is None else (_flat(mask), True)


def _grad_sums(x1, dy1, mask, mean, plan, ws, sums, invstd, grads):
    want = grads is not None
    _launch(_kernels().grad_sums, plan.blocks, x1, dy1, *_mask(mask, x1), mean, plan.geo,
            ws.states, ws.tickets, sums, invstd if want else mean, grads if want else sums,
            want)


def _grad_input(dy1, x1, mask, mean, invstd, weight, sums, count, training, plan, out1):
    _launch(_kernels().grad_input, plan.blocks, dy1, x1, *_mask(mask, x1), mean, invstd,
            invstd if weight is None else weight, weight is not None, sums, float(count),
            bool(training), plan.geo, out1)


BACKEND = GPU()
