"""Numba machinery the kernels share: the serial twin of a parallel kernel."""
import types

from numba import njit


def serial_twin(kernel):
    """A ``cache=True`` njit function running ``kernel``'s code in one thread.

    ``prange`` is ``range`` without ``parallel=True``, so the twin runs the
    same tasks in the same order and gives the same bits, without the cost
    of starting threads. It is a copy of the Python function under another
    name, so that numba's disk cache keeps it apart from the parallel one
    (the cache is keyed by name and bytecode, not by compile options).
    """
    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                              f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__ = f.__module__
    twin.__doc__ = f":func:`{f.__name__}` in the calling thread only."
    return njit(cache=True)(twin)
