"""A repair of numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which
:func:`nbbn.gpu.backend.cuda` applies when it finds the simulator.

The simulator runs a block's threads as Python threads and keeps a launch's
shared arrays by the line that asks for one (``FakeCUDAShared.array``, in
numba 0.68's simulator and numba-cuda's): it looks the line up, then makes and
stores an array if none is there, in two steps. Two threads that ask at the
same moment can both find none, and each gets an array of its own. Their
writes never meet, and a reduction over the block then reads ``np.empty``'s
garbage: nbbn's GPU ghost-batch tests got wrong gradients so, under load,
about one run in ten. :func:`make_shared_arrays_safe` makes the lookup and the
store one step under a lock, for every kernel the process runs on the
simulator. A GPU has one shared array per block in hardware.
"""
import sys
import threading

import numpy as np


def make_shared_arrays_safe():
    """Replace the simulator's ``FakeCUDAShared.array`` by one that gives
    every thread of a block the same array (once; later calls do nothing)."""
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "one_per_block", False):
        return
    original, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None:  # (numba-cuda's simulator refuses it)
            return original(self, shape, dtype, alignment)
        if shape == 0:  # dynamic shared memory: one buffer made before the launch
            return original(self, shape, dtype)
        caller = sys._getframe(1)
        line = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's key
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        with lock:
            made = self._allocations.get(line)
            if made is None:
                made = self._allocations[line] = np.empty(shape, dtype)
        return made

    array.one_per_block = True
    shared.array = array
