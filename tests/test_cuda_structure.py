"""The GPU path's structure, pinned without a GPU (numba's CUDA simulator,
see tests/cudasim.py): in steady state a call allocates no device memory,
a training step reads nothing back from the device, and each call stays
within its launches (training forward 2, evaluation forward 1, backward 2);
the pool recycles arrays only once every view of them is gone, on the
simulator and with numba's real device-array classes (no GPU needed for
those: nothing is launched)."""
import gc
import threading

import numpy as np
import pytest

import nbbn
from conftest import random_input
from cudasim import (SIMULATOR, activity, cpu, here, host, simulator_run,  # noqa: F401
                     fast_switching, small_launch)  # (fixtures)
from nbbn.functional import batch_norm_backward, native_batch_norm
from nbbn.gpu import backend as _cuda

test_simulator_run = simulator_run(__file__, min_passed=14)

#: The channel layout, rows of a few channels, channels last (several tiles).
SHAPES = [((3, 2, 9), 1), ((6, 3), 1), ((4, 3, 3), -1), ((5, 3, 2), 1)]
simulated = pytest.mark.skipif(not SIMULATOR, reason="counts the simulator's calls")


def steps(layer, x, dy, n):
    """``n`` training steps, each keeping its output until the next one's is
    made (as a training loop does)."""
    y = dx = None
    for _ in range(n):
        y = layer(x)
        dx = layer.backward(dy)
    return y, dx


def device_inputs(rng, shape, dtype=np.float32):
    return (_cuda.to_device(random_input(rng, shape, dtype)),
            _cuda.to_device(random_input(rng, shape, dtype, 0.0, 1.0)))


@here
@simulated
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_layer_steady_state(rng, activity, shape, axis, activation):
    layer = nbbn.BatchNorm(shape[axis], axis=axis, activation=activation, device="cuda")
    x, dy = device_inputs(rng, shape)
    steps(layer, x, dy, 2)  # the pool holds two of everything after two steps
    activity.clear()
    y = layer(x)
    assert dict(activity) == {"launches": 2}  # no allocation, no read, no write
    activity.clear()
    layer.backward(dy)
    assert dict(activity) == {"launches": 2}
    layer.eval()
    y = layer(x)
    layer.backward(dy)
    activity.clear()
    y = layer(x)
    assert dict(activity) == {"launches": 1}
    activity.clear()
    layer.backward(dy)
    assert dict(activity) == {"launches": 2}
    activity.clear()
    assert layer.num_batches_tracked == 3  # the read: one copy to the host
    assert dict(activity) == {"reads": 1}
    del y


@here
@simulated
@pytest.mark.parametrize("options", [dict(virtual_batch_size=2), dict(momentum=None)],
                         ids=["ghost", "cumulative"])
def test_options_allocate_and_read_nothing(rng, activity, options):
    layer = nbbn.BatchNorm(3, device="cuda", **options)
    renorm = nbbn.BatchRenorm(3, device="cuda")
    x, dy = device_inputs(rng, (5, 3, 4))
    for bn in (layer, renorm):
        steps(bn, x, dy, 3)
        activity.clear()
        steps(bn, x, dy, 2)
        assert activity["allocations"] == activity["reads"] == activity["writes"] == 0, activity
    assert renorm.num_batches_tracked == 5
    assert layer.num_batches_tracked == 5 * (3 if "virtual_batch_size" in options else 1)


@here
@simulated
def test_functional_steady_state(rng, activity):
    x, dy = device_inputs(rng, (5, 3, 4), np.float64)
    rm, rv = _cuda.to_device(np.zeros(3)), _cuda.to_device(np.ones(3))
    w = _cuda.to_device(np.full(3, 2.0))
    for _ in range(2):
        y, mean, invstd = native_batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5)
        dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w)
    activity.clear()
    y, mean, invstd = native_batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5)
    assert dict(activity) == {"launches": 2}
    activity.clear()
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, w)
    assert dict(activity) == {"launches": 2}
    activity.clear()
    y = nbbn.batch_norm(x, rm, rv, w)
    assert dict(activity) == {"launches": 1}
    nbbn.batch_norm(x, np.zeros(3), np.ones(3), training=True)  # NumPy statistics:
    activity.clear()  # copied to the device, updated, copied back
    rm_host, rv_host = np.zeros(3), np.ones(3)
    nbbn.batch_norm(x, rm_host, rv_host, training=True)
    assert activity["allocations"] == 0 and activity["launches"] == 2
    assert activity["writes"] == 1 and activity["reads"] == 2  # statistics, counts
    np.testing.assert_allclose(rm_host, host(rm) / (1 - 0.9**3) * 0.1, rtol=1e-12)
    del y, dx, dw, db


@here
@simulated
def test_non_contiguous_input_is_refused_before_any_launch(rng, activity):
    bn = nbbn.BatchNorm(3, device="cuda")
    strided = _cuda.to_device(np.ones((4, 6), np.float32))[:, ::2]
    activity.clear()
    with pytest.raises(ValueError, match="C-contiguous on the device"):
        bn(strided)
    assert activity["launches"] == 0


# --- the simulator itself --------------------------------------------------------------


if SIMULATOR:  # a global, so that the simulator swaps it for its own module in kernels
    from numba import cuda, int32


def _total_of_four_threads(out):
    """A kernel (compiled by the test): four threads write a shared array, thread 0 adds it up."""
    values = cuda.shared.array(4, int32)
    values[cuda.threadIdx.x] = cuda.threadIdx.x + 1
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        out[0] = values[0] + values[1] + values[2] + values[3]


@here
@simulated
def test_the_simulators_shared_array_is_one_for_the_block(monkeypatch):
    """On the simulator, once nbbn's GPU path is loaded, four threads that ask
    for a shared array at the same moment get the same one
    (``nbbn.gpu.simulator``): each thread's ``np.empty`` waits until the
    other three are in theirs too, or for 0.5 s."""
    from numba.cuda.simulator.kernel import BlockThread

    _cuda.cuda()  # what any GPU call of nbbn does first

    together, empty = threading.Barrier(4), np.empty

    def slow_empty(*args, **kwargs):
        if isinstance(threading.current_thread(), BlockThread):
            try:
                together.wait(timeout=0.5)
            except threading.BrokenBarrierError:
                pass
        return empty(*args, **kwargs)

    kernel = cuda.jit(_total_of_four_threads)
    monkeypatch.setattr(np, "empty", slow_empty)
    out = np.zeros(1, np.int64)
    kernel[1, 4](out)
    assert out[0] == 10


# --- the pool --------------------------------------------------------------------


@here
def test_pool_recycles_an_array_when_its_last_view_goes():
    pool = _cuda._pool
    device = _cuda._device()
    a = pool.take((4, 5), np.float32, device)
    view, reshaped = a[1:, ::2], a.reshape(20)
    address = _address(a)
    del a
    gc.collect()
    b = pool.take((20,), np.float32, device)
    assert _address(b) != address  # the views keep it
    del view
    gc.collect()
    c = pool.take((20,), np.float32, device)
    assert _address(c) != address
    del reshaped
    gc.collect()
    d = pool.take((10,), np.float64, device)  # as many bytes: the same memory
    assert _address(d) == address
    assert pool.take((20,), np.float32, device).shape == (20,)
    del b, c, d


def _address(a):
    if hasattr(a, "__cuda_array_interface__"):
        return a.__cuda_array_interface__["data"][0]
    return a._ary.__array_interface__["data"][0]


@cpu  # numba's device-array classes, not the simulator's
def test_pool_lends_numba_device_arrays_with_views_counted():
    """The GPU's lending (``nbbn.gpu.memory._lend_device``) with numba's own
    pointer and array classes over a fake address: nothing touches the
    device, so no GPU is needed; the backing array is released when the last
    view goes, as numba's allocator frees its memory."""
    import ctypes
    import itertools
    import types

    from numba.cuda.cudadrv import devicearray, driver

    from nbbn.gpu.memory import Pool, _Arrays, _lend_device

    backing = types.SimpleNamespace(gpu_data=driver.MemoryPointer(
        None, ctypes.c_void_p(0x10000), 96))
    released, lent, arrays = [], {}, _Arrays()
    pool = Pool(None, simulated=False)
    for _ in range(2):  # the second time from the template made the first
        a = _lend_device(backing, (4, 3), np.dtype(np.float64), lambda: released.append(1),
                         lent, itertools.count(), arrays)
        assert isinstance(a, devicearray.DeviceNDArray) and a.is_c_contiguous()
        assert a.__cuda_array_interface__["data"][0] == 0x10000 and a.shape == (4, 3)
        assert a.strides == (24, 8) and a.alloc_size == 96 and a.dtype == np.float64
        rows = pool.rows(a)
        assert [r.__cuda_array_interface__["data"][0] for r in rows] == [
            0x10000 + 24 * i for i in range(4)]
        assert all(r.shape == (3,) and r.alloc_size == 24 for r in rows)
        row, flat = a._do_getitem(2), pool.flat(a)  # (a[2] only adds a context check)
        assert row.__cuda_array_interface__["data"][0] == 0x10000 + 2 * 24
        assert flat.shape == (12,) and flat.__cuda_array_interface__["data"][0] == 0x10000
        assert pool.flat(flat) is flat
        del a
        gc.collect()
        assert not released and len(lent) == 1
        del row, rows
        gc.collect()
        assert not released
        del flat
        gc.collect()
        assert released == [1] and not lent
        released.clear()


@cpu  # numba's device-array classes, not the simulator's
def test_a_launch_key_decides_numba_types():
    """Launches reuse a kernel specialized for the first arguments of the same
    key (``nbbn.gpu.backend._kind``): arrays made every way nbbn makes them,
    with equal keys, have one numba type; scalars' Python types decide theirs."""
    import ctypes
    import itertools
    import types

    from numba import typeof
    from numba.cuda.cudadrv import devicearray, driver

    from nbbn.gpu.backend import _kind
    from nbbn.gpu.memory import Pool, _Arrays, _lend_device

    pool, arrays = Pool(None, simulated=False), _Arrays()
    memory = driver.MemoryPointer(None, ctypes.c_void_p(0x10000), 1 << 12)
    backing = types.SimpleNamespace(gpu_data=memory)

    def lent(shape, dtype):
        return _lend_device(backing, shape, np.dtype(dtype), lambda: None, {}, itertools.count(),
                            arrays)

    def made(shape, dtype):  # numba's constructor
        itemsize = np.dtype(dtype).itemsize
        strides = (itemsize,) if len(shape) == 1 else (shape[1] * itemsize, itemsize)
        return devicearray.DeviceNDArray(shape, strides, dtype, gpu_data=memory)

    a2 = lent((4, 6), np.float32)
    same = [[lent((6,), np.float32), made((6,), np.float32), pool.rows(a2)[1],
             a2._do_getitem(3), pool.flat(lent((2, 3), np.float32))],
            [lent((4, 6), np.float32), made((4, 6), np.float32)],
            [lent((3,), np.float64), pool.rows(lent((2, 3), np.float64))[0]],
            [a2._do_getitem((slice(None), slice(None, None, 2)))],  # strided: layout A
            [lent((4, 3), np.float32)]]  # the same shape and dtype, contiguous: layout C
    for group in same:
        assert len({_kind(a) for a in group}) == 1
        assert len({typeof(a) for a in group}) == 1
    kinds = [_kind(g[0]) for g in same]
    assert len(set(kinds)) == len(kinds)
    assert typeof(same[3][0]).layout == "A" and typeof(same[0][0]).layout == "C"
    for values in ([True, False], [3, 1 << 40], [0.5, 1e-5], [(1, 2), (3, 4)]):
        assert len({_kind(v) for v in values}) == 1 and len({typeof(v) for v in values}) == 1
