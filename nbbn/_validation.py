"""Every check of user input, in one place. Each returns arrays the kernels
can take (native byte order, C-contiguous, writable) or raises a clear
TypeError/ValueError before anything is changed."""
import math
import numbers
import warnings

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = FLOAT_DTYPES
_F16 = np.dtype(np.float16)
#: The names of the dtypes nbbn computes in: the half types are inputs (and,
#: optionally, parameters) only; their statistics are float64 (see _half.py).
DTYPE_NAMES = "float16, bfloat16, float32 or float64"
_BFLOAT16_MISSING = ("bfloat16 needs the ml_dtypes package (NumPy's bfloat16): "
                     "pip install 'nbbn[bfloat16]'")


#: The half types' names, and the integer views standing for them in the
#: kernels (nbbn/_half.py).
HALF_VIEWS = {"float16": np.uint16, "bfloat16": np.int16}


def _half_view(dtype):
    """The integer view type of half ``dtype`` (float16, ml_dtypes' bfloat16),
    or None. By its scalar type's name: ``dtype.name`` is computed in Python,
    2 us a call for float16 (measured), several times a call of the layer."""
    return HALF_VIEWS.get(dtype.type.__name__) if dtype.itemsize == 2 else None


def is_half(dtype):
    """Whether ``dtype`` is float16 or bfloat16 (ml_dtypes')."""
    return _half_view(dtype) is not None


def kernel_view(a):
    """``a`` as the kernels take it: a float16 or bfloat16 array as its 16-bit
    integer view (uint16, int16), any other array as it is."""
    view = _half_view(a.dtype)
    return a if view is None else a.view(view)


def is_float(dtype):
    """Whether the kernels take arrays of ``dtype``: float16, bfloat16, float32, float64."""
    return dtype in FLOAT_DTYPES or is_half(dtype)


def grad_dtype(dtype):
    """The dtype of the functional API's parameter gradients for inputs of
    ``dtype``: float32 for the half types (torch's mixed mode), else ``dtype``."""
    return _F32 if is_half(dtype) else dtype


def _named_bfloat16(dtype):
    """``ml_dtypes.bfloat16``'s dtype if ``dtype`` names it (a string); None
    otherwise. Raises TypeError when ml_dtypes is not installed."""
    if not (isinstance(dtype, str) and dtype.strip().lower() == "bfloat16"):
        return None
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(_BFLOAT16_MISSING) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_device_array(a):
    """Whether ``a`` lives on a GPU: a Numba device array or any object with
    ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors)."""
    return type(a) is not np.ndarray and (bool(getattr(a, "__cuda_ndarray__", False))
                                          or hasattr(a, "__cuda_array_interface__"))


def float_dtype(dtype, name="dtype"):
    """``dtype`` as a NumPy dtype: float16, bfloat16 (``ml_dtypes.bfloat16``,
    or the name 'bfloat16' where ml_dtypes is installed), float32 or float64."""
    dt = _named_bfloat16(dtype)
    if dt is None:
        try:
            dt = np.dtype(dtype).newbyteorder("=")
        except TypeError:
            raise TypeError(f"{name} must be {DTYPE_NAMES}, got {dtype!r}") from None
    if not is_float(dt):
        raise TypeError(f"{name} must be {DTYPE_NAMES}, got {dtype!r}")
    return dt


def as_array(x, name="x"):
    """``x`` as a float16/bfloat16/float32/float64 array the kernels can read.

    A copy is made only when needed: other byte order, not C-contiguous, or
    read-only. The caller's array is never written to.
    """
    if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64
                                  or (is_half(x.dtype) and x.dtype.isnative)):
        flags = x.flags
        if flags.c_contiguous and flags.writeable:
            return x
    a = np.asarray(x)
    if not is_float(a.dtype.newbyteorder("=")):
        raise TypeError(f"{name} must have dtype {DTYPE_NAMES}, got {a.dtype}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, order="C")
    return a


#: Where a layer computes: NumPy arrays and the CPU kernels, or numba.cuda.
DEVICES = ("cpu", "cuda")


def device(d):
    """``d`` must be 'cpu' or 'cuda'."""
    if d not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {d!r}")
    return d


def check_axis(axis):
    if axis not in (1, -1):
        raise ValueError(f"axis must be 1 (channels first) or -1 (channels last), got {axis!r}")
    return axis


def check_input(x, axis, num_features=None):
    """Check the shape of an input for channels on ``axis``; return the channel
    count. A batch of no samples is accepted (as torch), but not one of no
    channels."""
    if axis == 1 and not 2 <= x.ndim <= 5:
        raise ValueError(
            f"expected a 2-D to 5-D input (N, C, ...) with axis=1, got shape {x.shape}")
    if axis == -1 and x.ndim < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (..., C), got shape {x.shape}")
    channels = x.shape[axis]
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"expected {num_features} channels on axis {axis}, got {channels} "
            f"(input shape {x.shape})")
    if channels == 0:
        raise ValueError(f"expected at least one channel, got input of shape {x.shape}")
    return channels


def check_batch_size(x, channels):
    """Training needs more than one value per channel (as torch)."""
    if x.size // channels == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape {x.shape}")


def check_like(a, x, name):
    """``a`` (dy, out) must have the shape and dtype of ``x``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.shape != x.shape:
        raise ValueError(f"{name} must have shape {x.shape}, got {a.shape}")
    if a.dtype.newbyteorder("=") != x.dtype:
        raise TypeError(f"{name} must have dtype {x.dtype}, got {a.dtype}")


def check_out(out, x):
    """``out`` must be a writable C-contiguous array like ``x``."""
    if type(out) is np.ndarray and out.shape == x.shape and out.dtype is x.dtype:
        flags = out.flags
        if flags.c_contiguous and flags.writeable:
            return out
    check_like(out, x, "out")
    if not (out.dtype.isnative and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be a writable, C-contiguous array in native byte order")
    return out


def channel_vector(v, name, channels, widen=True):
    """A per-channel vector of shape (C,) as float64, or None. With ``widen``
    False a float32 array is returned as it is too (the kernels widen its
    values, exactly). Arrays that need no conversion are not copied; half
    ones (float16, bfloat16) are widened exactly."""
    if v is None:
        return None
    if type(v) is np.ndarray and v.shape == (channels,):
        dtype = v.dtype
        if dtype is _F32 and widen:
            return v.astype(np.float64)  # (faster than astype(_F64), measured)
        if (dtype is _F64 or dtype is _F32) and v.flags.c_contiguous:
            return v
    a = np.asarray(v)
    if a.dtype.kind not in "fiu" and not is_half(a.dtype):
        raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
    if a.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {a.shape}")
    return a.astype(np.float64)


def running_stats(mean, var, channels):
    """Running statistics to update in place: both or neither, writable float (C,)."""
    if (type(mean) is np.ndarray and type(var) is np.ndarray
            and (mean.dtype is _F32 or mean.dtype is _F64)
            and (var.dtype is _F32 or var.dtype is _F64)
            and mean.shape == var.shape == (channels,)
            and mean.flags.writeable and var.flags.writeable):
        return
    if (mean is None) != (var is None):
        raise ValueError("running_mean and running_var must be given together")
    for v, name in ((mean, "running_mean"), (var, "running_var")):
        if v is None:
            continue
        if not isinstance(v, np.ndarray) or not is_float(v.dtype.newbyteorder("=")):
            raise TypeError(f"{name} must be a {DTYPE_NAMES} NumPy array, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
        if not (v.flags.writeable and v.dtype.isnative):
            raise ValueError(f"{name} must be writable and in native byte order (it is updated in place)")


def momentum(m, allow_none=False):
    """A finite momentum (any real number, as torch: ``(1 - m) * running + m *
    batch``), or None where ``allow_none``; NaN and infinities are refused, they
    would turn the running statistics into NaN without a word."""
    if type(m) is float and m - m == 0.0:  # finite (inf - inf and NaN - NaN are NaN)
        return m
    if m is None and allow_none:
        return None
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m):
        raise ValueError(f"momentum must be a finite number{' or None' if allow_none else ''}, "
                         f"got {m!r}")
    return float(m)


def eps(e):
    if type(e) is float and 0.0 < e < math.inf:
        return e
    if isinstance(e, bool) or not isinstance(e, numbers.Real) or not (e > 0 and math.isfinite(e)):
        raise ValueError(f"eps must be a positive finite number, got {e!r}")
    return float(e)


def num_features(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_features must be a positive integer, got {n!r}")
    return int(n)


def virtual_batch_size(k):
    """Ghost batch size: None or a positive integer."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"virtual_batch_size must be None or a positive integer, got {k!r}")
    return int(k)


def renorm_limit(value, name, lowest):
    """``rmax`` (>= 1) or ``dmax`` (>= 0) of batch renormalization; inf allowed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= lowest:
        raise ValueError(f"{name} must be a number >= {lowest}, got {value!r}")
    return float(value)


#: Activations the kernels can fuse after the normalization.
ACTIVATIONS = ("relu",)


def activation(a):
    """A fused activation: None or one of ``ACTIVATIONS``."""
    if a is None:
        return None
    if not isinstance(a, str):
        raise TypeError(f"activation must be None or one of {ACTIVATIONS}, got {a!r}")
    if a not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {a!r}")
    return a


def saved_output(y, x, relu, like):
    """The forward's output ``y`` that a ReLU backward masks with: required
    with the ReLU, refused without it. ``like(y, x, 'y')`` converts and checks
    it (each backend has its own)."""
    if not relu:
        if y is not None:
            raise ValueError("y (the forward's output) is only used with activation='relu'")
        return None
    if y is None:
        raise ValueError("activation='relu' needs y, the output of the forward pass")
    return like(y, x, "y")


def warn_not_finite(stacklevel, what="running statistics", batches=None):
    """Say that a batch with NaN or Inf left the running statistics as they
    were; ``batches``: so many, found when the GPU was read (docs/gpu.md)."""
    found = "" if batches is None else (f" in {batches} batch{'es' if batches > 1 else ''} "
                                        "since the GPU was last read")
    warnings.warn(f"batch statistics are not finite (NaN or Inf in the input){found}: {what} "
                  "were not updated", RuntimeWarning, stacklevel=stacklevel + 1)
