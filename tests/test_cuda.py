"""The GPU path (nbbn.gpu.backend, nbbn.gpu.kernels) against the CPU path and the
float64 reference.

These tests need numba.cuda on a GPU or on numba's CUDA simulator: see
tests/cudasim.py for how a plain ``python -m pytest`` runs them anyway (in a
subprocess with NUMBA_ENABLE_CUDASIM=1), with small launch constants.
"""
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, random_input
from cudasim import (GPU, SIMULATOR, cpu, gpu_backward, gpu_forward, here, host, run_bounded,
                     simulator_run,
                     fast_switching, small_launch)  # noqa: F401 (autouse fixtures)
from nbbn.gpu import backend as _cuda
from nbbn.functional import batch_norm_backward, native_batch_norm

#: SHAPES plus the rows-layout corners of the small launch: narrow rows
#: shared by several lanes, one column, channels of several columns.
GPU_SHAPES = SHAPES + [((10, 2), 1), ((9, 3, 3), 1), ((7, 1), -1)]
test_simulator_run = simulator_run(__file__, min_passed=83)


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(host(actual), expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def run(code, env):
    """``(returncode, output)`` of ``python -c code``."""
    return run_bounded([sys.executable, "-c", code], env)


@cpu
def test_the_cpu_path_never_enters_the_gpu_backend():
    """import nbbn, and every CPU call (layers with all their options, the
    functions), import neither numba.cuda nor nbbn's GPU backend."""
    code = textwrap.dedent("""
        import sys, numpy as np, nbbn
        x = np.ones((4, 3, 70), np.float32)
        for layer in (nbbn.BatchNorm(3, activation="relu", virtual_batch_size=2),
                      nbbn.BatchRenorm(3), nbbn.BatchNorm(3, axis=-1)):
            for mode in (True, False):
                layer.train(mode)
                y = layer(x if layer.axis == 1 else x.transpose(0, 2, 1))
                layer.backward(y)
        y, mean, invstd = nbbn.functional.native_batch_norm(x, None, None, None, None, True,
                                                            0.1, 1e-5)
        nbbn.functional.batch_norm_backward(y, x, mean, invstd)
        loaded = [m for m in sys.modules if m.startswith(("numba.cuda", "nbbn.gpu"))]
        assert not loaded, loaded
    """)
    rc, out = run(code, dict(os.environ))
    assert rc == 0, out


@cpu
def test_cuda_without_gpu_or_simulator_is_a_runtime_error():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    rc, out = run("import numba.cuda, nbbn, pytest\n"
                 "if numba.cuda.is_available(): raise SystemExit(3)\n"
                 "with pytest.raises(RuntimeError, match='NUMBA_ENABLE_CUDASIM'):\n"
                 "    nbbn.BatchNorm(3, device='cuda')\n"
                 "bn = nbbn.BatchNorm(3)\n"
                 "with pytest.raises(RuntimeError, match='no CUDA GPU'):\n"
                 "    bn.to('cuda')\n"
                 "assert bn.device == 'cpu' and type(bn.gamma).__name__ == 'ndarray'\n", env)
    if rc == 3:
        pytest.skip("a GPU is present")
    assert rc == 0, out


def test_device_names():
    with pytest.raises(ValueError, match="'cpu' or 'cuda', got 'gpu'"):
        nbbn.BatchNorm(3, device="gpu")
    assert nbbn.BatchNorm(3).to("cpu").device == "cpu"


def parameters(rng, c, dtype):
    return (rng.uniform(0.5, 2, c), rng.standard_normal(c),
            rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype))


@here
@pytest.mark.parametrize("shape,axis", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_match_cpu(rng, shape, axis, dtype, training):
    c = shape[axis]
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype, 0.0, 1.0)
    w, b, rm, rv = parameters(rng, c, dtype)
    rm_cpu, rv_cpu, x0 = rm.copy(), rv.copy(), x.copy()
    ref = naive.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3, axis=axis)
    y, mean, invstd = gpu_forward(x, rm, rv, w, b, training, 0.3, 1e-3, axis=axis)
    y_cpu, mean_cpu, invstd_cpu = native_batch_norm(x, rm_cpu, rv_cpu, w, b, training, 0.3, 1e-3,
                                             axis=axis)
    assert _cuda.is_device_array(y) and y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(x, x0)
    for gpu, on_cpu, expected in ((y, y_cpu, ref[0]), (mean, mean_cpu, ref[3]),
                                  (invstd, invstd_cpu, ref[4])):
        assert_close(gpu, on_cpu, dtype)
        assert_close(gpu, expected, dtype)
    assert_close(rm, rm_cpu, dtype)
    assert_close(rv, rv_cpu, dtype)
    dx, dw, db = gpu_backward(dy, x, mean, invstd, w, training, axis=axis)
    dx_cpu, dw_cpu, db_cpu = batch_norm_backward(dy, x, mean_cpu, invstd_cpu, w, training,
                                                 axis=axis)
    ref_dx, ref_dw, ref_db = naive.batch_norm_backward(dy, x, ref[3], ref[4], w, training, axis)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    for gpu, on_cpu, expected in ((dx, dx_cpu, ref_dx), (dw, dw_cpu, ref_dw),
                                  (db, db_cpu, ref_db)):
        assert_close(gpu, on_cpu, dtype)
        np.testing.assert_allclose(host(gpu), expected, rtol=10 * RTOL[dtype],
                                   atol=10 * ATOL[dtype] * np.abs(expected).max())


@here
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,axis", [((6, 3, 5, 4), 1), ((8, 5), -1)])
def test_layer_matches_cpu_over_steps(rng, shape, axis, momentum):
    cpu = nbbn.BatchNorm(shape[axis], momentum=momentum, axis=axis)
    gpu = nbbn.BatchNorm(shape[axis], momentum=momentum, axis=axis, device="cuda")
    assert repr(gpu).endswith(", device='cuda')")
    for step in range(3):
        x = random_input(rng, shape, np.float32, loc=step)
        dy = random_input(rng, shape, np.float32, 0.0, 1.0)
        assert_close(gpu(x), cpu(x), np.float32)
        assert_close(gpu.backward(dy), cpu.backward(dy), np.float32)
        assert_close(gpu.grad_gamma, cpu.grad_gamma, np.float32)
        assert_close(gpu.grad_beta, cpu.grad_beta, np.float32)
        state, state_cpu = gpu.state_dict(), cpu.state_dict()
        assert all(type(v) is np.ndarray for v in state.values())
        for k in state:
            assert state[k].dtype == state_cpu[k].dtype
            assert_close(state[k], state_cpu[k], np.float32)
    gpu.eval(), cpu.eval()
    x = random_input(rng, shape, np.float32)
    assert_close(gpu(x), cpu(x), np.float32)
    assert_close(gpu.backward(x), cpu.backward(x), np.float32)


@here
def test_layer_without_affine_or_running_stats(rng):
    x, dy = random_input(rng, (5, 3, 2), np.float64), random_input(rng, (5, 3, 2), np.float64)
    for mode in (True, False):
        gpu = nbbn.BatchNorm(3, affine=False, track_running_stats=False, dtype=np.float64,
                             device="cuda").train(mode)
        cpu = nbbn.BatchNorm(3, affine=False, track_running_stats=False,
                             dtype=np.float64).train(mode)
        assert_close(gpu(x), cpu(x), np.float64)
        assert_close(gpu.backward(dy), cpu.backward(dy), np.float64)
        assert gpu.grad_gamma is None and gpu.state_dict() == {}


@here
def test_to_moves_the_state_and_back(rng):
    bn = nbbn.BatchNorm(4, dtype=np.float64)
    bn(random_input(rng, (5, 4), np.float64))
    state = bn.state_dict()
    assert bn.to("cuda") is bn and bn.device == "cuda"
    assert all(_cuda.is_device_array(getattr(bn, k))
               for k in ("gamma", "beta", "running_mean", "running_var"))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    bn.load_state_dict({k: v + 1 for k, v in state.items()})
    assert _cuda.is_device_array(bn.running_mean) and bn.num_batches_tracked == 2
    assert bn.to("cpu") is bn and type(bn.running_mean) is np.ndarray
    np.testing.assert_array_equal(bn.running_var, state["running_var"] + 1)


@here
def test_device_arrays_in_functional_api(rng):
    from numba import cuda
    x = random_input(rng, (6, 3, 4), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    rm_d, rv_d, x_d = cuda.to_device(rm), cuda.to_device(rv), cuda.to_device(x)
    y = nbbn.batch_norm(x_d, rm_d, rv_d, cuda.to_device(np.full(3, 2.0)), None, training=True)
    ref = naive.batch_norm(x, rm, rv, np.full(3, 2.0), None, True, axis=1)
    assert_close(y, ref[0], np.float64)
    assert_close(rm_d, ref[1], np.float64)
    assert_close(rv_d, ref[2], np.float64)
    nbbn.batch_norm(x_d, rm, rv, training=True)  # NumPy statistics: updated in place too
    assert_close(rm, ref[1], np.float64)
    out = cuda.device_array_like(x_d)
    y, mean, invstd = nbbn.functional.native_batch_norm(x_d, rm_d, rv_d, None, None, False,
                                                        0.1, 1e-5, out=out)
    assert _cuda.shares_memory(y, out)
    dx, _, _ = batch_norm_backward(x, x_d, mean, invstd, training=False, out=cuda.device_array_like(x_d))
    assert_close(dx, x * host(invstd)[:, None], np.float64)


@here
def test_non_finite_batch_skips_the_running_update(rng):
    x = random_input(rng, (4, 3, 5), np.float32)
    x[1, 2, 3] = np.nan
    gpu, cpu = nbbn.BatchNorm(3, device="cuda"), nbbn.BatchNorm(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the forward does not read the device back
        y = host(gpu(x))
    with pytest.warns(RuntimeWarning, match="not finite"):
        y_cpu = cpu(x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_cpu))
    with pytest.warns(RuntimeWarning, match=r"not finite \(NaN or Inf in the input\) in 1 "
                                            "batch since the GPU was last read: running"):
        assert gpu.num_batches_tracked == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        state = gpu.state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(v, cpu.state_dict()[k])


#: The points that read a GPU layer's counts, each of which warns about the
#: non-finite batches since the last one.
READS = {"num_batches_tracked": lambda bn: bn.num_batches_tracked,
         "state_dict": lambda bn: bn.state_dict(), "to('cpu')": lambda bn: bn.to("cpu"),
         "nbbn.gpu.sync": lambda bn: nbbn.gpu.sync(),
         "reset_running_stats": lambda bn: bn.reset_running_stats()}


@here
@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nan_batches_are_counted_on_the_device_and_said_at_the_next_read(rng, read, momentum):
    import nbbn.gpu
    gpu = nbbn.BatchNorm(3, momentum=momentum, device="cuda")
    cpu = nbbn.BatchNorm(3, momentum=momentum)
    bad = random_input(rng, (4, 3, 5), np.float32)
    bad[0, 1, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (random_input(rng, (4, 3, 5), np.float32), bad, bad,
                  random_input(rng, (4, 3, 5), np.float32)):
            gpu(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpu(x)
    with pytest.warns(RuntimeWarning, match="in 2 batches since the GPU was last read"):
        READS[read](gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if read == "reset_running_stats":  # (the skips were said before the reset)
            assert gpu.num_batches_tracked == 0
            return
        assert gpu.num_batches_tracked == cpu.num_batches_tracked == 2  # (the cumulative
        for k, v in gpu.state_dict().items():  # average skips them too)
            np.testing.assert_allclose(v, cpu.state_dict()[k], rtol=1e-6)


@here
def test_functional_nan_batch_with_device_or_numpy_statistics(rng):
    """Device running statistics: skipped on the device, said at nbbn.gpu.sync();
    NumPy ones: copied back in the call, which says it at once, as on the CPU."""
    import nbbn.gpu
    x = random_input(rng, (4, 3, 5), np.float64)
    x[2, 0, 1] = np.nan
    x_d = _cuda.to_device(x)
    rm, rv = _cuda.to_device(np.zeros(3)), _cuda.to_device(np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbbn.batch_norm(x_d, rm, rv, training=True)
    with pytest.warns(RuntimeWarning, match="in 1 batch since the GPU was last read"):
        nbbn.gpu.sync()
    np.testing.assert_array_equal(host(rm), 0)
    np.testing.assert_array_equal(host(rv), 1)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.warns(RuntimeWarning, match=r"not finite \(NaN or Inf in the input\): running"):
        nbbn.batch_norm(x_d, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0)
    x[2, 0, 1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbbn.batch_norm(_cuda.to_device(x), rm, rv, training=True)
        nbbn.gpu.sync()
    np.testing.assert_allclose(rm, naive.batch_norm(x, np.zeros(3), np.ones(3), training=True)[1])


@here
def test_bad_input_changes_nothing(rng):
    from numba import cuda
    bn = nbbn.BatchNorm(3, device="cuda")
    state = bn.state_dict()
    x = random_input(rng, (4, 3, 5), np.float32)
    cases = [
        (TypeError, "dtype float32 or float64, got int64", np.ones((4, 3), np.int64), {}),
        (ValueError, "expected 3 channels on axis 1, got 4", np.ones((2, 4), np.float32), {}),
        (ValueError, "more than 1 value per channel", np.ones((1, 3), np.float32), {}),
        (ValueError, "out must have shape", x, {"out": cuda.device_array((4, 3), np.float32)}),
        (TypeError, "out must have dtype float32", x, {"out": cuda.device_array(x.shape)}),
        (TypeError, "out must be a device array", x, {"out": np.empty_like(x)}),
        # a strided view of device memory (slicing with a step: a view on a GPU
        # too, where DeviceNDArray.T copies)
        (ValueError, "C-contiguous on the device",
         cuda.to_device(np.ones((4, 6), np.float32))[:, ::2], {}),
    ]
    for error, match, bad, kwargs in cases:
        with pytest.raises(error, match=match):
            bn(bad, **kwargs)
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, state[k])
    with pytest.raises(TypeError, match="layer is on the CPU"):
        nbbn.BatchNorm(3)(cuda.to_device(x))
    x_d = cuda.to_device(x)
    with pytest.raises(ValueError, match="axis must be 1"):
        nbbn.batch_norm(x_d, axis=2, training=True)
    with pytest.raises(ValueError, match="required when training=False"):
        nbbn.batch_norm(x_d)
    with pytest.raises(ValueError, match="momentum"):
        nbbn.batch_norm(x_d, bn.running_mean, bn.running_var, training=True, momentum=float("nan"))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        nbbn.batch_norm(x_d, bn.running_mean, np.ones(4, np.float32), training=True)
    with pytest.raises(ValueError, match="dy must have shape"):
        batch_norm_backward(np.ones((4, 3), np.float32), x_d, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nbbn.batch_norm(x_d, weight=cuda.to_device(np.ones(2)), training=True)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


@here
@pytest.mark.parametrize("shape,axis", [((3, 2, 37), 1), ((13, 3), -1), ((9, 3, 3), 1),
                                        ((5, 3, 2), 1), ((6, 5), -1)])
def test_results_do_not_depend_on_threads_per_block(rng, monkeypatch, shape, axis):
    x, dy = random_input(rng, shape, np.float64), random_input(rng, shape, np.float64)
    results = []
    for tpb in (1, 2, 4):
        monkeypatch.setattr(_cuda, "THREADS_PER_BLOCK", tpb)
        y, mean, invstd = gpu_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis)
        dx, dw, db = gpu_backward(dy, x, mean, invstd, None, True, axis=axis)
        results.append([host(a) for a in (y, mean, invstd, dx, dw, db)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@here
@pytest.mark.parametrize("dtype", DTYPES)
def test_numerical_traps(rng, dtype):
    x = np.full((4, 2, 9), 1e7, dtype)
    x[:, 1] = random_input(rng, (4, 9), dtype, 1e4, 1e-2)  # large offset, small spread
    y, mean, invstd = gpu_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=1)
    y = host(y)
    assert (y[:, 0] == 0).all()  # a constant channel: exactly 0 (torch issue 5410)
    ref = naive.batch_norm(x, training=True)
    # variance condition number ~1e12: float64 references agree to ~1e-11 only
    np.testing.assert_allclose(host(invstd), ref[4], rtol=max(RTOL[dtype], 1e-10))
    np.testing.assert_allclose(y[:, 1], ref[0][:, 1], rtol=1e-3, atol=1e-3)


#: (shape, axis, ROW_TILE): the channel layout with parts across planes
#: (planes wider than LANES, then narrower: a lane steps over a plane or more),
#: rows whose parts are capped at LANES (longer runs), channels last over two
#: tiles of columns.
LONG_RUNS = [((7, 2, 9), 1, 32), ((7, 2, 3), 1, 2), ((150, 2), 1, 32), ((9, 4, 5), -1, 32)]


@pytest.fixture
def long_runs(monkeypatch):
    """Lanes of about 11 values: four loads at a time, then the rest."""
    monkeypatch.setattr(_cuda, "ELEMENTS_PER_LANE", 11)
    return lambda row_tile: monkeypatch.setattr(_cuda, "ROW_TILE", row_tile)


@here
@pytest.mark.parametrize("shape,axis,row_tile", LONG_RUNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_variance_at_a_large_offset_and_a_constant_channel(rng, long_runs, shape, axis,
                                                           row_tile, dtype):
    """Lanes' sums of deviations from their first value, then Chan merges:
    the variance at mean 1e7 to 1e-9 (relative) of the float64 reference's,
    a constant channel exactly (mean 1e7, variance 0, output 0); the same
    bits again."""
    long_runs(row_tile)
    x = (1e7 + rng.standard_normal(shape) * 3).astype(dtype)
    np.moveaxis(x, axis, 0)[0] = 1e7
    x_d = _cuda.to_device(x)
    mean, var = _cuda.GPU.moments(x_d, axis)
    sample_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    ref = np.var(x.astype(np.float64), axis=sample_axes)
    assert host(mean)[0] == 1e7 and host(var)[0] == 0
    np.testing.assert_allclose(host(var)[1:], ref[1:], rtol=1e-9)
    np.testing.assert_allclose(host(mean), np.mean(x.astype(np.float64), axis=sample_axes),
                               rtol=1e-15)
    y, _, _ = gpu_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis)
    assert (np.moveaxis(host(y), axis, 0)[0] == 0).all()
    again = _cuda.GPU.moments(x_d, axis)
    np.testing.assert_array_equal(host(again[1]), host(var))


@here
@pytest.mark.parametrize("shape,axis,row_tile", LONG_RUNS)
def test_long_runs_match_cpu(rng, long_runs, shape, axis, row_tile):
    long_runs(row_tile)
    x, dy = random_input(rng, shape, np.float32), random_input(rng, shape, np.float32)
    mask = random_input(rng, shape, np.float32)
    y, mean, invstd = gpu_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis,
                                  activation="relu")
    y_cpu, mean_cpu, invstd_cpu = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5,
                                                    axis=axis, activation="relu")
    assert_close(y, y_cpu, np.float32)
    for training in (True, False):
        grads = gpu_backward(dy, x, mean, invstd, None, training, axis=axis, y=mask,
                             activation="relu")
        grads_cpu = batch_norm_backward(dy, x, mean_cpu, invstd_cpu, None, training, axis=axis,
                                        y=mask, activation="relu")
        for gpu, cpu in zip(grads, grads_cpu):
            assert_close(gpu, cpu, np.float32)


@here
@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), c=st.integers(1, 4), inner=st.integers(1, 9),
       channels_last=st.booleans(), double=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_cpu(n, c, inner, channels_last, double, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float64 if double else np.float32
    shape, axis = ((n, inner, c), -1) if channels_last else ((n, c, inner), 1)
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
    y, mean, invstd = gpu_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis)
    y_cpu, mean_cpu, invstd_cpu = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5,
                                             axis=axis)
    assert_close(y, y_cpu, dtype)
    dx = gpu_backward(dy, x, mean, invstd, None, True, axis=axis)[0]
    assert_close(dx, batch_norm_backward(dy, x, mean_cpu, invstd_cpu, axis=axis)[0], dtype)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_torch_cuda_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    x = torch.randn(8, 4, 6, 6, device="cuda")
    w, b = torch.rand(4, device="cuda") + 0.5, torch.randn(4, device="cuda")
    rm, rv = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    rm_t, rv_t = rm.clone(), rv.clone()
    y = nbbn.batch_norm(x, rm, rv, w, b, training=True)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, training=True)
    np.testing.assert_allclose(y.copy_to_host(), y_t.cpu().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rv.cpu().numpy(), rv_t.cpu().numpy(), rtol=1e-5, atol=1e-6)


@here
def test_benchmark_runs(monkeypatch):
    """Every part of the run (cases with eval, per-call rows, the copy
    bandwidth); on the simulator nothing is timed (NaN), torch is left out."""
    from nbbn.programs.cuda_bench import benchmark, format_table
    if SIMULATOR:
        monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    res = benchmark([((2, 3, 4, 4), 1), ((3, 2, 4), -1)], repeat=1,
                    calls=[("functional train", (4, 3)), ("layer forward+backward", (4, 3, 2))])
    assert set(res["bandwidth"]) == {"memcpy", "kernel", "best"}
    assert [r["shape"] for r in res["cases"]] == [(2, 3, 4, 4), (3, 2, 4)]
    for r in res["cases"]:
        assert set(r["nbbn"]) == set(r["roofline"]["nbbn"]) == {"train", "eval", "backward"}
        assert (r["torch"] is None) == SIMULATOR
    assert [r["call"] for r in res["per_call"]] == ["functional train", "layer forward+backward"]
    times = [t for r in res["cases"] for t in r["nbbn"].values()] + [r["nbbn"] for r in
                                                                     res["per_call"]]
    assert all(np.isnan(t) for t in times) if SIMULATOR else all(t > 0 for t in times)
    table = format_table(res)
    assert "| (3, 2, 4) | -1 | eval |" in table and "| layer forward+backward | (4, 3, 2) |" in table


@here
def test_bench_command_on_the_gpu(monkeypatch, capsys, tmp_path):
    from nbbn.__main__ import main
    if SIMULATOR:
        monkeypatch.setitem(sys.modules, "torch", None)
    path = tmp_path / "gpu.json"
    assert main(["bench", "--device", "cuda", "--shapes", "2x3x4x4", "--repeat", "1",
                 "--json", str(path)]) == 0
    table = capsys.readouterr().out
    for op in ("train", "eval", "backward"):
        assert f"| (2, 3, 4, 4) | 1 | {op} |" in table
    assert "Per call" not in table  # (the default run only)
    assert '"backward"' in path.read_text() and '"bandwidth"' in path.read_text()
