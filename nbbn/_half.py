"""Half-precision elements inside the CPU kernels. Numba's CPU target compiles
neither float16 nor bfloat16, so the kernels see such arrays as 16-bit integer
views and convert in registers:

* ``uint16`` stands for float16 (IEEE binary16), ``int16`` for bfloat16 (the
  top half of a float32); :func:`kernel_view` makes the views;
* :func:`load` widens an element to float32 exactly (float arrays: the element
  as it is);
* :func:`store` rounds a float32 or float64 value to the array's type once,
  to nearest even, with overflow to inf and correct subnormals (a float64
  value is first rounded to float32 *to odd*, which makes the second rounding
  exact: the result is the float64 value correctly rounded).

The conversions are branch-free integer and float arithmetic, so loops over
them vectorize. tests/test_half.py checks them against NumPy's and ml_dtypes'
casts over every 16-bit input, and over every float32 for the narrowing.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: NumPy dtype names of the half types, and the integer views standing for them.
HALF_VIEWS = {"float16": np.uint16, "bfloat16": np.int16}


def kernel_view(a):
    """``a`` as the kernels take it: a float16 or bfloat16 array as its 16-bit
    integer view (uint16, int16), any other array as it is."""
    view = HALF_VIEWS.get(a.dtype.name)
    return a if view is None else a.view(view)


# --- bit casts -------------------------------------------------------------------

@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 bits of integer ``bits``."""
    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _bits_of_f32(typingctx, f):
    """The bits of float32 ``f`` as an int64 (0 <= bits < 2**32)."""
    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.int64(types.float32), codegen


# --- widening: exact ---------------------------------------------------------------

@njit
def f16_to_f32(u):
    """float16 bits ``u`` as float32. The magnitude's bits, moved to float32's
    mantissa and scaled by 2**112, give normals and subnormals alike; inf and
    NaN (magnitude >= 65536 after scaling) get float32's all-ones exponent."""
    h = np.int64(u) & 0xFFFF
    f = _f32_from_bits((h & 0x7FFF) << 13) * np.float32(5.192296858534828e33)  # 2**112
    b = _bits_of_f32(f)
    b = b | 0x7F800000 if f >= np.float32(65536.0) else b
    return _f32_from_bits(b | (h & 0x8000) << 16)


@njit
def bf16_to_f32(u):
    """bfloat16 bits ``u`` as float32: the top half of its bits."""
    return _f32_from_bits((np.int64(u) & 0xFFFF) << 16)


# --- narrowing: rounded to nearest even, once ----------------------------------------

@njit
def _f32_round_to_odd(x):
    """float64 ``x`` rounded to float32 to odd: truncated, with the last bit
    set if anything was dropped. Rounding that to a type of at most 22
    significant bits gives ``x`` correctly rounded (no double rounding)."""
    f = np.float32(x)
    b = _bits_of_f32(f)
    dropped = np.float64(f) != x and x == x
    toward = 1 if abs(np.float64(f)) < abs(x) else -1
    return _f32_from_bits(b + toward if dropped and (b & 1) == 0 else b)


@njit
def _sign_magnitude(x):
    """float32 ``x``'s sign bit in a 16-bit type's place, and the bits of ``|x|``."""
    f = _bits_of_f32(x)
    return (f >> 16) & 0x8000, f & 0x7FFFFFFF


@njit
def f32_to_f16(x):
    """float32 ``x`` as float16 bits, rounded to nearest even (overflow to
    inf, NaN to a quiet NaN of the same sign)."""
    sign, a = _sign_magnitude(x)
    # below 2**-14 (float16's subnormals): float addition of 0.5 does the rounding
    small = _bits_of_f32(_f32_from_bits(a) + np.float32(0.5)) - 0x3F000000
    # normal: rebias the exponent, round the 13 dropped bits to nearest even
    normal = (a - 0x37FFF001 + ((a >> 13) & 1)) >> 13
    large = 0x7E00 if a > 0x7F800000 else 0x7C00
    o = large if a >= 0x47800000 else (small if a < 0x38800000 else normal)
    return np.uint16(o | sign)


@njit
def f32_to_bf16(x):
    """float32 ``x`` as bfloat16 bits, rounded to nearest even (overflow to
    inf, NaN to a quiet NaN of the same sign)."""
    sign, a = _sign_magnitude(x)
    rounded = (a + 0x7FFF + ((a >> 16) & 1)) >> 16
    return np.int16(np.uint16((0x7FC0 if a > 0x7F800000 else rounded) | sign))


# --- the kernels' element access ---------------------------------------------------------

def float_empty(n, a):
    """``np.empty(n)`` of ``a``'s float type: float32 for a half array's view
    (inside jitted code)."""


def load(a, i):
    """``a[i]`` as a float (float32 for a half array, inside jitted code)."""


def store(a, i, v):
    """``a[i] = v``, rounded once to a half array's type (inside jitted code)."""


@overload(float_empty)
def _float_empty(n, a):
    if a.dtype in (types.uint16, types.int16):
        return lambda n, a: np.empty(n, np.float32)
    return lambda n, a: np.empty(n, a.dtype)


@overload(load)
def _load(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: f16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: bf16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(store)
def _store(a, i, v):
    narrow = {types.uint16: f32_to_f16, types.int16: f32_to_bf16}.get(a.dtype)
    if narrow is None:
        def plain(a, i, v):
            a[i] = v
        return plain
    if v == types.float64:
        def from_f64(a, i, v):
            a[i] = narrow(_f32_round_to_odd(v))
        return from_f64

    def from_f32(a, i, v):
        a[i] = narrow(np.float32(v))
    return from_f32
