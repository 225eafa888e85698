"""Numba machinery the kernels share: the serial twin of a parallel kernel,
vector intrinsics with non-temporal stores, and the disk cache (keyed on
every kernel source, with a fallback folder)."""
import functools
import hashlib
import os
import tempfile
import types as pytypes

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


def use_temporary_cache_dir():
    """Point numba's disk cache (``cache=True``) at a per-user folder of the
    temporary directory; for when neither the package's folder nor the user's
    cache folder can be written (numba then refuses to define the kernels)."""
    import numba

    user = os.getuid() if hasattr(os, "getuid") else "user"
    path = os.path.join(tempfile.gettempdir(), f"nbbn-numba-cache-{user}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"no writable folder for numba's cache (tried {path}: {e}); "
                           "set NUMBA_CACHE_DIR to one") from None
    numba.config.CACHE_DIR = path


# --- the disk cache ------------------------------------------------------------
#: The modules whose code a kernel's machine code holds: numba stamps a cached
#: function with its own file only, so an edit to a loop it calls from
#: another of these would load stale code (as happened to this project's
#: tests after edits to kernel_loops.py). Their hash is added to the stamp.
KERNEL_SOURCES = ("kernels.py", "kernel_loops.py", "_half.py", "_jit.py")
_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def kernel_sources_hash():
    """SHA-256 of :data:`KERNEL_SOURCES`, read once a process; None where
    they are not plain files (a zip import: numba's stamp is the zip's)."""
    digest = hashlib.sha256()
    try:
        for name in KERNEL_SOURCES:
            with open(os.path.join(_HERE, name), "rb") as f:
                digest.update(f.read())
    except OSError:
        return None
    return digest.hexdigest()


def _stamp_cache_with_kernel_sources():
    """Put first in numba's list of cache locators one for the functions of
    nbbn's own folder: the folder numba would choose for them, and the
    stamp numba would give them plus :func:`kernel_sources_hash`."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or not hasattr(caching, "_CacheLocator"):
        return  # another numba: its own stamps only

    class KernelSourcesLocator(caching._CacheLocator):
        def __init__(self, inner):
            self._inner = inner

        def ensure_cache_path(self):
            self._inner.ensure_cache_path()

        def get_cache_path(self):
            return self._inner.get_cache_path()

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

        def get_source_stamp(self):
            return self._inner.get_source_stamp(), kernel_sources_hash()

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _HERE:
                return None
            for other in impl._locator_classes:
                inner = None if other is cls else other.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
            return None

    classes = impl._locator_classes
    if not any(c.__name__ == KernelSourcesLocator.__name__ for c in classes):
        classes.insert(0, KernelSourcesLocator)


_stamp_cache_with_kernel_sources()


def parallel_kernel(f):
    """``f`` compiled as a ``cache=True`` parallel kernel whose ``prange``
    loops, and nothing else, run on numba's threads: with ``parallel=True``
    numba would also turn array expressions (``counts.sum()`` of a few
    values, say) into parallel regions of their own, each waking the team
    once more per call, and compile each as one more function."""
    return njit(parallel={"prange": True, "comprehension": False, "reduction": False,
                          "inplace_binop": False, "setitem": False, "numpy": False,
                          "stencil": False, "fusion": False}, cache=True)(f)


def serial_twin(kernel):
    """A ``cache=True`` njit function running ``kernel``'s code in one thread.

    ``prange`` is ``range`` without ``parallel=True``, so the twin runs the
    same tasks in the same order and gives the same bits, without the cost
    of starting threads. It is a copy of the Python function under another
    name, so that numba's disk cache keeps it apart from the parallel one
    (the cache is keyed by name and bytecode, not by compile options).
    """
    f = kernel.py_func
    twin = pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                              f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__ = f.__module__
    twin.__doc__ = f":func:`{f.__name__}` in the calling thread only."
    return njit(cache=True)(twin)


# --- optional arrays and coefficients ----------------------------------------
# The ReLU mask is None or an array. numba prunes ``if a is None`` only when
# ``a`` is None, so a plain helper would return an Optional for an array;
# these pick the piece by type at compile time instead. ``at`` lets one loop
# take a per-span scalar coefficient (planes) or per-column arrays (rows).

def span(a, n, c, lo, hi):
    """``a[n, c, lo:hi]``, or None for None (inside jitted code)."""


def row(a, r, lo, hi):
    """``a[r, lo:hi]``, or None for None (inside jitted code)."""


def at(a, i):
    """``a[i]`` of an array, or the scalar ``a`` itself (inside jitted code)."""


def plane_rows(a):
    """(N, C, M) ``a`` as its (N, C * M) rows, or None for None (inside jitted code)."""


def head(a, n):
    """``a[:n]``, or None for None (inside jitted code)."""


def tail(a, lo):
    """``a[lo:]``, or None for None (inside jitted code)."""


@overload(span)
def _span(a, n, c, lo, hi):
    if isinstance(a, types.NoneType):
        return lambda a, n, c, lo, hi: None
    return lambda a, n, c, lo, hi: a[n, c, lo:hi]


@overload(row)
def _row(a, r, lo, hi):
    if isinstance(a, types.NoneType):
        return lambda a, r, lo, hi: None
    return lambda a, r, lo, hi: a[r, lo:hi]


@overload(at, inline="always")
def _at(a, i):
    if isinstance(a, types.Array):
        return lambda a, i: a[i]
    return lambda a, i: a


@overload(plane_rows)
def _plane_rows(a):
    if isinstance(a, types.NoneType):
        return lambda a: None
    return lambda a: a.reshape((a.shape[0], a.shape[1] * a.shape[2]))


@overload(head)
def _head(a, n):
    if isinstance(a, types.Array):
        return lambda a, n: a[:n]
    return lambda a, n: a


@overload(tail)
def _tail(a, lo):
    if isinstance(a, types.Array):
        return lambda a, lo: a[lo:]
    return lambda a, lo: a


def by_element(floats, other):
    """A function for jitted code that calls ``floats`` when its last argument
    (the output) is a float array and ``other`` when it is the 16-bit view of
    a half one (see :mod:`nbbn._half`), chosen at compile time: a code path
    only float arrays can take is never compiled for the others.

    (The non-temporal stores below are for float arrays only: half elements
    converted in 64-byte vectors of 32 and stored so were slower than plain
    stores in the forward passes and no faster in the backward, at two threads
    on the machine measured.)"""
    # The choice is inlined into the caller and takes the arguments by name:
    # a call through ``*args`` packs them in a tuple, whose arrays cost their
    # reference counts on every call (measured: up to 15% of a float32
    # evaluation of (4096, 1024) at two threads, one call per row).
    code = floats.py_func.__code__
    names = ", ".join(code.co_varnames[:code.co_argcount])
    last = code.co_varnames[code.co_argcount - 1]
    scope = {"floats": floats, "other": other, "types": types}
    exec(f"def pick({names}):\n"
         f"    raise NotImplementedError('for jitted code only')\n"
         f"def choose({names}):\n"
         f"    impl = floats if isinstance({last}.dtype, types.Float) else other\n"
         f"    return lambda {names}: impl({names})\n", scope)
    pick = scope["pick"]
    overload(pick, inline="always")(scope["choose"])
    pick.__name__ = pick.__qualname__ = f"{floats.__name__}_or_{other.__name__}"
    return pick


# --- non-temporal (streaming) stores -----------------------------------------
# Writing an array much larger than the caches through them costs a read of
# every line before it is written (write-allocate): a third more traffic for
# y = f(x). These intrinsics compute one 64-byte vector of output and store it
# with a non-temporal store, which skips that read. The arithmetic is the
# scalar loops' own, operation for operation (float64, no fused multiply-add),
# so the bits are the same; the destination must be 64-byte aligned.

#: Bytes of one streamed vector (and the alignment its destination needs).
STREAM_BYTES = 64


def _vector_type(context, arrty):
    elt = context.get_value_type(arrty.dtype)
    return ir.VectorType(elt, STREAM_BYTES // context.get_abi_sizeof(elt))


def _load(context, builder, arrty, arr, i, as_double):
    """The vector at ``arr[i:]`` (unaligned), widened to float64 if asked."""
    vt = _vector_type(context, arrty)
    data = context.make_array(arrty)(context, builder, arr).data
    v = builder.load(builder.bitcast(builder.gep(data, [i]), vt.as_pointer()),
                     align=context.get_abi_sizeof(vt.element))
    if as_double and vt.element != ir.DoubleType():
        v = builder.fpext(v, ir.VectorType(ir.DoubleType(), vt.count))
    return v


def _splat(builder, value, count):
    vt = ir.VectorType(value.type, count)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), count), [0] * count))


def _stream_store(context, builder, arrty, arr, i, v):
    vt = _vector_type(context, arrty)
    if vt.element != ir.DoubleType():
        v = builder.fptrunc(v, vt)
    data = context.make_array(arrty)(context, builder, arr).data
    store = builder.store(v, builder.bitcast(builder.gep(data, [i]), vt.as_pointer()),
                          align=STREAM_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def stream_axpb(typingctx, x, i, a, b, relu, out):
    """``out[i:i+w] = x[i:i+w] * a + b`` (then ``0.0 if v < 0.0 else v`` if
    ``relu``), ``w = STREAM_BYTES / itemsize``, stored non-temporally."""
    def codegen(context, builder, sig, args):
        xv, iv, av, bv, rv, ov = args
        w = _vector_type(context, sig.args[0]).count
        v = builder.fmul(_load(context, builder, sig.args[0], xv, iv, True), _splat(builder, av, w))
        v = builder.fadd(v, _splat(builder, bv, w))
        zero = ir.Constant(v.type, None)
        negative = builder.and_(builder.fcmp_ordered("<", v, zero),
                                _splat(builder, builder.trunc(rv, ir.IntType(1))
                                       if rv.type != ir.IntType(1) else rv, w))
        _stream_store(context, builder, sig.args[5], ov, iv, builder.select(negative, zero, v))
        return context.get_dummy_value()
    return types.void(x, types.intp, types.float64, types.float64, types.boolean, out), codegen


@intrinsic
def stream_grad_input(typingctx, dy, x, mask, i, a, b, c, mean, out):
    """``out[i:i+w] = g * a + (x - mean) * b + c`` stored non-temporally, with
    ``g = dy``, or ``g = dy + 0.0 if mask > 0 else 0.0`` unless ``mask`` is None."""
    masked = not isinstance(mask, types.NoneType)

    def codegen(context, builder, sig, args):
        dyv, xv, mv, iv, av, bv, cv, meanv, ov = args
        w = _vector_type(context, sig.args[1]).count
        g = _load(context, builder, sig.args[0], dyv, iv, True)
        zero = ir.Constant(g.type, None)
        if masked:
            m = _load(context, builder, sig.args[2], mv, iv, True)
            g = builder.select(builder.fcmp_ordered(">", m, zero), builder.fadd(g, zero), zero)
        t = builder.fsub(_load(context, builder, sig.args[1], xv, iv, True),
                         _splat(builder, meanv, w))
        v = builder.fadd(builder.fmul(g, _splat(builder, av, w)),
                         builder.fmul(t, _splat(builder, bv, w)))
        v = builder.fadd(v, _splat(builder, cv, w))
        _stream_store(context, builder, sig.args[8], ov, iv, v)
        return context.get_dummy_value()
    f8 = types.float64
    return types.void(dy, x, mask, types.intp, f8, f8, f8, f8, out), codegen


@intrinsic
def store_fence(typingctx):
    """``sfence`` (a full fence off x86): order this thread's non-temporal
    stores before what follows."""
    def codegen(context, builder, sig, args):
        if builder.module.triple.startswith(("x86_64", "i386", "i686")):
            fn = ir.FunctionType(ir.VoidType(), [])
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=fn), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen
