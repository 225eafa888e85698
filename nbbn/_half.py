"""Half-precision elements inside the CPU kernels. Numba's CPU target compiles
neither float16 nor bfloat16, so the kernels see such arrays as 16-bit integer
views and convert in registers:

* ``uint16`` stands for float16 (IEEE binary16), ``int16`` for bfloat16 (the
  top half of a float32); :func:`nbbn._validation.kernel_view` makes the
  views (outside this module, so that ``import nbbn`` does not import numba);
* :func:`load` widens an element to float32 exactly (float arrays: the element
  as it is);
* :func:`store` rounds a float32 value to the array's type once, to nearest
  even, with overflow to inf and correct subnormals; a float64 value is
  rounded to float32 first. That second rounding is within 1 ulp of the
  float64 value correctly rounded, and is it except where the float32 lands
  exactly on a tie of the half type (measured on normalized random data: one
  output in 10**4 for float16, fewer for bfloat16). Rounding to float32 *to
  odd* first would make it exact, and the normalizing loop 2.3 times as slow
  (measured: the 4-lane float64 compares it needs cost more than the rest).

The conversions are branch-free and vectorize: 32-bit integer operations on
LLVM vectors, and F16C's instructions for float16 where the target has them
(the integer functions otherwise). tests/test_half.py checks them against
NumPy's and ml_dtypes' casts over every 16-bit input, and a dense sweep of
float32 for the narrowing.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

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


# --- narrowing: rounded to nearest even ------------------------------------------------

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


# --- in registers: LLVM IR on scalars and vectors alike --------------------------------
# What the kernels run: 32-bit integer operations (numba widens the functions above
# to 64-bit ones, halving the vector width), and where the target converts float16
# in hardware (x86's F16C: LLVM lowers ``fpext``/``fptrunc`` of half to it), those
# instructions. The functions above are the fallback for float16 without F16C.

def hardware_float16(context=None):
    """Whether numba's CPU target converts float16 in hardware (x86's F16C)."""
    if context is None:
        from numba.core.registry import cpu_target
        context = cpu_target.target_context
    return "+f16c" in getattr(context.codegen(), "_tm_features", "")


def _shaped(ty, element):
    """``element``'s type in the shape of ``ty`` (a scalar, or a vector of as many)."""
    return ir.VectorType(element, ty.count) if isinstance(ty, ir.VectorType) else element


def _constant(ty, value):
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def widen_ir(builder, bits, bfloat):
    """16-bit ``bits`` (i16, scalar or vector) as float32, exactly: bfloat16's
    are the top half of a float32; float16's need the hardware conversion."""
    f32 = _shaped(bits.type, ir.FloatType())
    if bfloat:
        i32 = _shaped(bits.type, ir.IntType(32))
        return builder.bitcast(builder.shl(builder.zext(bits, i32), _constant(i32, 16)), f32)
    return builder.fpext(builder.bitcast(bits, _shaped(bits.type, ir.HalfType())), f32)


def narrow_ir(builder, f, bfloat):
    """float32 ``f`` (scalar or vector) as 16-bit bits, rounded to nearest even,
    overflow to inf, NaN to a quiet NaN of the same sign (bfloat16: a rounding
    add on the bits, which carries into the exponent as it should; float16:
    the hardware conversion)."""
    i16, i32 = _shaped(f.type, ir.IntType(16)), _shaped(f.type, ir.IntType(32))
    if not bfloat:
        return builder.bitcast(builder.fptrunc(f, _shaped(f.type, ir.HalfType())), i16)
    bits = builder.bitcast(f, i32)
    top = builder.lshr(bits, _constant(i32, 16))
    odd = builder.and_(top, _constant(i32, 1))
    rounded = builder.lshr(builder.add(builder.add(bits, _constant(i32, 0x7FFF)), odd),
                           _constant(i32, 16))
    quiet = builder.or_(top, _constant(i32, 0x40))  # a NaN's sign and top payload, quiet
    o = builder.select(builder.fcmp_unordered("uno", f, f), quiet, rounded)
    return builder.trunc(o, i16)


def _f16_to_f32_soft(u):
    return f16_to_f32(u)


def _f32_to_f16_soft(x):
    return f32_to_f16(x)


@intrinsic
def _widen(typingctx, bits):
    """Half ``bits`` (uint16: float16, int16: bfloat16) as float32."""
    bfloat = bits == types.int16

    def codegen(context, builder, sig, args):
        if bfloat or hardware_float16(context):
            return widen_ir(builder, args[0], bfloat)
        return context.compile_internal(builder, _f16_to_f32_soft, sig, args)
    return types.float32(bits), codegen


@intrinsic
def _narrow(typingctx, v, a):
    """float32 or float64 ``v`` as an element of array ``a``: the bits of its
    half type (uint16: float16, int16: bfloat16), rounded to nearest even
    (float64: through float32)."""
    if v not in (types.float32, types.float64):
        return None
    bfloat = a.dtype == types.int16

    def codegen(context, builder, sig, args):
        f = args[0] if sig.args[0] == types.float32 else builder.fptrunc(args[0], ir.FloatType())
        if bfloat or hardware_float16(context):
            return narrow_ir(builder, f, bfloat)
        return context.compile_internal(builder, _f32_to_f16_soft,
                                        types.uint16(types.float32), [f])
    return a.dtype(v, a), codegen


# --- a value of the type: rounded once ---------------------------------------------------

@njit
def _to_odd(v):
    """float64 ``v`` as float32 rounded to odd: truncated toward 0, the last bit
    set if anything was dropped. A half rounding of it is ``v``'s own (float32
    has more than two bits to spare), where rounding ``v`` to float32 to nearest
    first can land on a tie of the half type."""
    f = np.float32(v)
    b = _bits_of_f32(f)
    odd = _f32_from_bits((b - 1 if abs(f + 0.0) > abs(v) else b) | 1)
    return f if f + 0.0 == v else odd


def nearest(v, a):
    """float64 ``v`` rounded once to nearest even in half array ``a``'s type,
    saturating at its largest finite value, as float32 (inside jitted code)."""


@overload(nearest)
def _nearest(v, a):
    top = {types.uint16: 65504.0, types.int16: 3.3895313892515355e38}.get(a.dtype)
    if top is None:
        return None
    return lambda v, a: _widen(_narrow(_to_odd(min(max(v, -top), top)), a))


# --- float32 arithmetic for half outputs --------------------------------------------------

@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once, in float32 (LLVM's ``fma``: vectorizes, and
    is the hardware instruction where the target has one)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32],
                                              ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)
    return types.float32(a, b, c), codegen


# --- the kernels' element access ---------------------------------------------------------

def float_empty(n, a):
    """``np.empty(n)`` of ``a``'s float type: float32 for a half array's view
    (inside jitted code)."""


def load(a, i):
    """``a[i]`` as a float (float32 for a half array, inside jitted code)."""


def store(a, i, v):
    """``a[i] = v``, rounded to a half array's type (through float32 for a
    float64 ``v``; inside jitted code)."""


@overload(float_empty)
def _float_empty(n, a):
    if a.dtype in (types.uint16, types.int16):
        return lambda n, a: np.empty(n, np.float32)
    return lambda n, a: np.empty(n, a.dtype)


@overload(load)
def _load(a, i):
    if a.dtype in (types.uint16, types.int16):
        return lambda a, i: _widen(a[i])
    return lambda a, i: a[i]


@overload(store)
def _store(a, i, v):
    if a.dtype in (types.uint16, types.int16):
        def narrowed(a, i, v):
            a[i] = _narrow(v, a)
        return narrowed

    def plain(a, i, v):
        a[i] = v
    return plain
