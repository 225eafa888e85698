"""The extras on the GPU path against the CPU path: the fused ReLU, Batch
Renormalization and ghost batches (their combinations, SyncBatchNorm's
included, are in tests/test_compose.py).

Run like tests/test_cuda.py (see tests/cudasim.py): in this process with
NUMBA_ENABLE_CUDASIM=1 or a GPU, otherwise in a subprocess under the simulator.
Tiny shapes: the simulator runs every CUDA thread as a Python thread.
"""

import numpy as np
import pytest

import nbbn
from conftest import random_input
from cudasim import (assert_same, gpu_backward, gpu_forward, here, host, simulator_run,
                     fast_switching, small_launch)  # noqa: F401 (autouse fixtures)
from nbbn.gpu import backend as _cuda
from nbbn.functional import batch_norm_backward, native_batch_norm

test_simulator_run = simulator_run(__file__, min_passed=50)

TOL = {np.float32: dict(rtol=1e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
#: A planes shape (plane >= LANES = 4), a rows shape, channels last.
SHAPES = [((3, 2, 9), 1), ((6, 3), 1), ((4, 3, 3), -1)]


def close(gpu, cpu, dtype):
    np.testing.assert_allclose(host(gpu), host(cpu), **TOL[dtype])


def params(rng, c, dtype):
    return (rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype),
            rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype))


def assert_layers_match(gpu, cpu, dtype):
    """Same parameters' gradients and state (NumPy) on both layers."""
    for name in ("grad_gamma", "grad_beta"):
        if getattr(cpu, name) is None:
            assert getattr(gpu, name) is None
        else:
            assert host(getattr(gpu, name)).dtype == getattr(cpu, name).dtype
            close(getattr(gpu, name), getattr(cpu, name), dtype)
    state, state_cpu = gpu.state_dict(), cpu.state_dict()
    assert state.keys() == state_cpu.keys()
    for k, v in state.items():
        assert type(v) is np.ndarray and v.dtype == state_cpu[k].dtype
        close(v, state_cpu[k], dtype)


# --- fused ReLU --------------------------------------------------------------

@here
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_relu_functional_matches_cpu(rng, shape, axis, dtype, training):
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
    w, b, rm, rv = params(rng, shape[axis], dtype)
    rm_cpu, rv_cpu = rm.copy(), rv.copy()
    y, mean, invstd = gpu_forward(x, rm, rv, w, b, training, 0.3, 1e-3, axis=axis,
                                       activation="relu")
    y_cpu, mean_cpu, invstd_cpu = native_batch_norm(x, rm_cpu, rv_cpu, w, b, training, 0.3, 1e-3,
                                             axis=axis, activation="relu")
    close(y, y_cpu, dtype)
    np.testing.assert_array_equal(host(y) > 0, y_cpu > 0)  # the same mask
    close(rm, rm_cpu, dtype)
    close(rv, rv_cpu, dtype)
    grads = gpu_backward(dy, x, mean, invstd, w, training, axis=axis, y=y, activation="relu")
    grads_cpu = batch_norm_backward(dy, x, mean_cpu, invstd_cpu, w, training, axis=axis,
                                    y=y_cpu, activation="relu")
    for gpu, cpu in zip(grads, grads_cpu):
        assert _cuda.is_device_array(gpu) and gpu.dtype == dtype
        close(gpu, cpu, dtype)
    masked = batch_norm_backward(np.where(y_cpu > 0, dy, 0).astype(dtype), x, mean_cpu,
                                 invstd_cpu, w, training, axis=axis)
    for fused, plain in zip(grads, masked):
        close(fused, plain, dtype)


@here
def test_relu_nan_propagates_and_gets_no_gradient():
    x = np.ones((2, 3, 4))
    x[0, 1, 2] = np.nan
    x_d = _cuda.to_device(x)
    y = nbbn.batch_norm(x_d, np.zeros(3), np.ones(3), activation="relu")
    assert_same(y, nbbn.batch_norm(x, np.zeros(3), np.ones(3), activation="relu"))
    assert np.isnan(host(y)[0, 1, 2])
    dx, _, _ = batch_norm_backward(np.ones_like(x), x_d, np.zeros(3), np.ones(3),
                                   training=False, y=y, activation="relu")
    assert host(dx)[0, 1, 2] == 0 and (np.delete(host(dx).ravel(), 6) == 1).all()


@here
@pytest.mark.parametrize("axis", [1, -1])
def test_relu_layer_matches_cpu_over_steps(rng, axis):
    shape = (5, 3, 4) if axis == 1 else (5, 4, 3)
    cpu = nbbn.BatchNorm(3, axis=axis, activation="relu")
    gpu = nbbn.BatchNorm(3, axis=axis, activation="relu", device="cuda")
    for step in range(2):
        x, dy = random_input(rng, shape, np.float32, loc=step), random_input(rng, shape, np.float32)
        close(gpu(x), cpu(x), np.float32)
        close(gpu.backward(dy), cpu.backward(dy), np.float32)
        assert_layers_match(gpu, cpu, np.float32)
    gpu.eval(), cpu.eval()
    close(gpu(x), cpu(x), np.float32)
    close(gpu.backward(dy), cpu.backward(dy), np.float32)


@here
def test_relu_bad_saved_output_is_refused(rng):
    x = _cuda.to_device(random_input(rng, (4, 3, 5), np.float32))
    y, mean, invstd = nbbn.functional.native_batch_norm(x, None, None, None, None, True, 0.1,
                                                        1e-5, activation="relu")
    out = _cuda.to_device(np.full((4, 3, 5), 7, np.float32))
    with pytest.raises(ValueError, match="needs y"):
        batch_norm_backward(x, x, mean, invstd, activation="relu", out=out)
    with pytest.raises(ValueError, match="only used with"):
        batch_norm_backward(x, x, mean, invstd, y=y, out=out)
    with pytest.raises(ValueError, match="y must have shape"):
        batch_norm_backward(x, x, mean, invstd, y=y[:2], activation="relu", out=out)
    with pytest.raises(ValueError, match="activation"):
        nbbn.batch_norm(x, training=True, activation="gelu")
    np.testing.assert_array_equal(host(out), 7)


# --- ghost batches -----------------------------------------------------------

@here
@pytest.mark.parametrize("shape,axis,k", [((7, 2, 5), 1, 3), ((10, 3), -1, 4),
                                          ((5, 2, 3), -1, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_ghost_layer_matches_cpu(rng, shape, axis, k, dtype, activation):
    c = shape[axis]
    kw = dict(axis=axis, dtype=dtype, virtual_batch_size=k, activation=activation,
              momentum=None if activation else 0.2)
    cpu, gpu = nbbn.BatchNorm(c, **kw), nbbn.BatchNorm(c, device="cuda", **kw)
    for step in range(2):
        x, dy = random_input(rng, shape, dtype, loc=step), random_input(rng, shape, dtype)
        y = gpu(x)
        assert _cuda.is_device_array(y)
        close(y, cpu(x), dtype)
        close(gpu.backward(dy), cpu.backward(dy), dtype)
        assert gpu.num_batches_tracked == cpu.num_batches_tracked == (step + 1) * -(-shape[0] // k)
        assert_layers_match(gpu, cpu, dtype)
    gpu.eval(), cpu.eval()
    close(gpu(x), cpu(x), dtype)


@here
def test_ghost_device_input_out_and_nan_group(rng):
    x = random_input(rng, (6, 3, 2), np.float64)
    x[4, 1, 0] = np.nan  # the last group: only its update is skipped
    gpu = nbbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=2, device="cuda")
    cpu = nbbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=2)
    x_d, out = _cuda.to_device(x), _cuda.cuda().device_array(x.shape)
    y = gpu(x_d, out=out)  # the skip is counted on the device, said when read
    with pytest.warns(RuntimeWarning, match="not finite"):
        y_cpu = cpu(x)
    assert _cuda.shares_memory(y, out)
    np.testing.assert_array_equal(np.isnan(host(y)), np.isnan(y_cpu))
    with pytest.warns(RuntimeWarning, match="not finite .* in 1 batch since the GPU"):
        assert gpu.num_batches_tracked == cpu.num_batches_tracked == 2
    assert_layers_match(gpu, cpu, np.float64)
    np.testing.assert_array_equal(host(x_d), x)
    with pytest.raises(TypeError, match="out must be a device array"):
        gpu(x, out=np.empty_like(x))


@here
def test_ghost_bad_input_changes_nothing(rng):
    gpu = nbbn.BatchNorm(3, virtual_batch_size=4, device="cuda")
    state = gpu.state_dict()
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*samples 4:5"):
        gpu(random_input(rng, (5, 3), np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        gpu(random_input(rng, (5, 4), np.float32))
    gpu(random_input(rng, (4, 3), np.float32))
    with pytest.raises(ValueError, match="dy must have shape"):
        gpu.backward(np.ones((4, 2), np.float32))
    assert gpu.num_batches_tracked == 1
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(gpu.state_dict()[k], state[k])


# --- Batch Renormalization ---------------------------------------------------

@here
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_renorm_matches_cpu_over_steps(rng, shape, axis, dtype, affine):
    c = shape[axis]
    kw = dict(rmax=1.5, dmax=0.5, momentum=0.3, affine=affine, axis=axis, dtype=dtype)
    cpu, gpu = nbbn.BatchRenorm(c, **kw), nbbn.BatchRenorm(c, device="cuda", **kw)
    if affine:
        w, b, _, _ = params(rng, c, dtype)
        for layer in (cpu, gpu):
            layer.load_state_dict(dict(layer.state_dict(), weight=w, bias=b))
    for step in range(3):  # shifted, scaled batches: r and d are clipped at first
        x = random_input(rng, shape, dtype, loc=2 - step, scale=3.0 - step)
        dy = random_input(rng, shape, dtype)
        close(gpu(x), cpu(x), dtype)
        close(gpu.backward(dy), cpu.backward(dy), dtype)
        assert gpu.num_batches_tracked == cpu.num_batches_tracked == step + 1
        assert_layers_match(gpu, cpu, dtype)
        # r and d (float64) come from running statistics held in the layer's
        # dtype, which match to its tolerance only: a last-bit difference of the
        # batch mean can round a float32 running mean the other way
        for a, b in zip(gpu._saved.groups[0].correction, cpu._saved.groups[0].correction):
            close(a, b, dtype)
        gpu.rmax, cpu.rmax = 2.0 + step, 2.0 + step  # relaxed during training
    close(gpu.running_std, cpu.running_std, dtype)
    gpu.eval(), cpu.eval()
    close(gpu(x), cpu(x), dtype)
    close(gpu.backward(dy), cpu.backward(dy), dtype)


@here
def test_renorm_corrections_are_clipped_on_the_gpu(rng):
    gpu = nbbn.BatchRenorm(2, rmax=1.5, dmax=0.5, dtype=np.float64, device="cuda")
    gpu(random_input(rng, (8, 2, 3), np.float64, loc=5.0, scale=4.0))
    r, d = gpu._saved.groups[0].correction
    np.testing.assert_array_equal(host(r), 1.5)
    np.testing.assert_array_equal(host(d), 0.5)


@here
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_renorm_rmax_1_dmax_0_is_exactly_batchnorm_on_the_gpu(rng, dtype, affine):
    bn = nbbn.BatchNorm(3, affine=affine, dtype=dtype, device="cuda")
    rn = nbbn.BatchRenorm(3, rmax=1.0, dmax=0.0, momentum=0.1, affine=affine, dtype=dtype,
                          device="cuda")
    if affine:
        w, b, _, _ = params(rng, 3, dtype)
        for layer in (bn, rn):
            layer.load_state_dict(dict(layer.state_dict(), weight=w, bias=b))
    x, dy = random_input(rng, (5, 3, 4), dtype), random_input(rng, (5, 3, 4), dtype)
    assert_same(rn(x), bn(x))
    assert_same(rn.backward(dy), bn.backward(dy))
    if affine:
        assert_same(rn.grad_gamma, bn.grad_gamma)
        assert_same(rn.grad_beta, bn.grad_beta)


@here
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the simulator's NumPy: inf - inf
def test_renorm_nan_batch_skips_the_moving_update(rng):
    x = random_input(rng, (4, 3, 2), np.float32)
    x[1, 2, 0] = np.inf
    gpu = nbbn.BatchRenorm(3, device="cuda")
    state = gpu.state_dict()
    y = host(gpu(x))
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()
    with pytest.warns(RuntimeWarning, match="1 batch since the GPU was last read: moving "
                                            "statistics were not updated"):
        assert gpu.num_batches_tracked == 0
    for k, v in gpu.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


@here
def test_renorm_to_and_back_keeps_the_state(rng):
    rn = nbbn.BatchRenorm(3, rmax=2.0, dtype=np.float64)
    rn(random_input(rng, (6, 3), np.float64))
    state = rn.state_dict()
    assert rn.to("cuda") is rn and repr(rn).endswith(", device='cuda')")
    assert _cuda.is_device_array(rn.running_var) and type(rn.running_std) is np.ndarray
    with pytest.raises(RuntimeError, match="before any forward"):
        rn.backward(np.ones((6, 3)))  # the pending backward was dropped
    for k, v in rn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(TypeError, match="layer is on the CPU"):
        rn.to("cpu")(_cuda.to_device(np.ones((6, 3))))
    for k, v in rn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


@here
def test_renorm_bad_input_changes_nothing(rng):
    gpu = nbbn.BatchRenorm(3, device="cuda")
    state = gpu.state_dict()
    for bad, error, match in ((np.ones((1, 3), np.float32), ValueError, "more than 1 value"),
                              (np.ones((4, 2), np.float32), ValueError, "expected 3 channels"),
                              (np.ones((4, 3), np.int32), TypeError, "float32 or float64")):
        with pytest.raises(error, match=match):
            gpu(bad)
    with pytest.raises(TypeError, match="out must have dtype"):
        gpu(np.ones((4, 3), np.float32), out=_cuda.cuda().device_array((4, 3)))
    assert gpu.num_batches_tracked == 0
    for k, v in gpu.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
