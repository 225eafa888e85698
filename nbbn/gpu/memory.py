"""Device memory that steady-state calls reuse instead of allocating (a
``cuda.device_array`` costs a ``cuMemAlloc``, about 80 us):

* :class:`Pool`: the arrays a call hands back (outputs, per-channel
  statistics, gradients). An array goes back to the pool when the last
  reference to it, or to any view of it, goes, and is handed out again to a
  later call asking for as many bytes, as torch's caching allocator does. All
  of nbbn's launches run on the default stream, in order, so a kernel still
  reading an array when its last reference goes runs before any kernel that
  writes the array's next use.
* the per-thread workspaces of ``nbbn.gpu.backend`` (scratch that never
  leaves a call) are plain device arrays kept for each shape.

Nothing here is imported by ``import nbbn``.
"""
import ctypes
import itertools
import math
import weakref

import numpy as np


def _strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _Arrays:
    """Numba device arrays over given memory, made fast: numba's constructor
    (about 25 us of Python) runs once per shape and dtype, for a template
    without memory, whose attributes each new array copies."""

    def __init__(self):
        self._templates = {}

    def make(self, shape, dtype, gpu_data):
        """A C-contiguous array of ``shape`` and ``dtype`` over ``gpu_data``
        (a numba memory pointer, which the array keeps)."""
        from numba.cuda.cudadrv import devicearray

        template = self._templates.get((shape, dtype))
        if template is None:
            template = devicearray.DeviceNDArray(shape, _strides(shape, dtype.itemsize), dtype,
                                                 gpu_data=gpu_data)
            template.gpu_data = None
            template.alloc_size = math.prod(shape) * dtype.itemsize
            self._templates[shape, dtype] = template
        a = devicearray.DeviceNDArray.__new__(devicearray.DeviceNDArray)
        a.__dict__.update(template.__dict__)
        a.gpu_data = gpu_data
        return a


def _lend_device(backing, shape, dtype, release, lent, tokens, arrays):
    """A Numba device array of ``shape`` and ``dtype`` over device array
    ``backing``'s memory; ``release()`` is called when it and every view of
    it are gone. Numba's own ownership scheme (``AutoFreePointer``, whose
    ``own()`` pointers count references, as ``cuMemAlloc``'s memory manager
    does); ``lent`` holds the pointer until then."""
    from numba.cuda.cudadrv import driver

    token = next(tokens)

    def finalize():
        del lent[token]
        release()

    data = backing.gpu_data
    mem = driver.AutoFreePointer(data.context, data.device_pointer,
                                 math.prod(shape) * dtype.itemsize, finalizer=finalize)
    lent[token] = mem
    return arrays.make(shape, dtype, mem.own())


def _lend_simulated(backing, shape, dtype, release, lent, tokens, arrays):
    """:func:`_lend_device` on numba's CUDA simulator, whose device arrays wrap
    NumPy arrays: the NumPy array is made over a ctypes buffer of its own, which
    every view keeps alive and whose finalizer calls ``release()``."""
    from numba.cuda.cudadrv import devicearray

    size = math.prod(shape)
    owner = (ctypes.c_char * (size * dtype.itemsize)).from_buffer(backing._ary)
    weakref.finalize(owner, release)
    return devicearray.FakeCUDAArray(np.frombuffer(owner, dtype, size).reshape(shape))


class Pool:
    """Device arrays recycled by size (see the module docstring).

    Parameters
    ----------
    cuda : module
        ``numba.cuda``.
    simulated : bool
        Whether ``cuda`` is numba's CUDA simulator.
    """

    def __init__(self, cuda, simulated):
        self._cuda = cuda
        self._simulated = simulated
        self._lend = _lend_simulated if simulated else _lend_device
        self._free = {}  # (device, bytes) -> backing arrays not lent
        self._lent = {}
        self._tokens = itertools.count()
        self._arrays = _Arrays()

    def take(self, shape, dtype, device):
        """A C-contiguous device array of ``shape`` and ``dtype`` on ``device``
        (a key of the current device): a free one of as many bytes, or a new one."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes:
            return self._cuda.device_array(shape, dtype)
        free = self._free.setdefault((device, nbytes), [])
        try:
            backing = free.pop()
        except IndexError:
            backing = self._cuda.device_array(nbytes, np.uint8)
        return self._lend(backing, shape, dtype, lambda: free.append(backing), self._lent,
                          self._tokens, self._arrays)

    def flat(self, a):
        """C-contiguous device array ``a`` as 1-D (``a.reshape(a.size)``, fast)."""
        if self._simulated or a.ndim == 1:
            return a if a.ndim == 1 else a.reshape(a.size)
        return self._arrays.make((a.size,), a.dtype, a.gpu_data)

    def rows(self, a):
        """The rows of C-contiguous 2-D device array ``a`` (``list(a)``, fast);
        each keeps ``a``'s memory as ``a[i]`` would."""
        if self._simulated:
            return [a[i] for i in range(a.shape[0])]
        step = a.shape[1] * a.dtype.itemsize
        return [self._arrays.make((a.shape[1],), a.dtype, a.gpu_data.view(i * step,
                                                                          (i + 1) * step))
                for i in range(a.shape[0])]

    def held(self):
        """Bytes held for reuse (not lent out)."""
        return sum(key[1] * len(free) for key, free in self._free.items())

    def clear(self):
        """Free the arrays not lent out (those lent come back later)."""
        for free in self._free.values():
            free.clear()
