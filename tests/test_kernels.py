"""The kernels' serial twins give the bits of the parallel kernels, for every
layout, dtype and variant (plain, fused ReLU, masked by a saved output)."""
import re

import numpy as np
import pytest

from nbbn import _engine

SHAPES = [((3, 4, 100), 1), ((2, 64, 49), 1), ((3, 4, 300), 1), ((2, 3, 70000), 1), ((4, 3, 7), 1),
          ((40, 5), 1), ((5, 6, 7, 3), -1), ((1000, 24), -1), ((13, 9000), 1),
          ((3, 20000), 1)]


def _run_both(layout, name, *args):
    k = _engine.kernels()
    outs = []
    for kernel in (getattr(k, name), getattr(k, name + "_serial")):
        copies = [a.copy() if isinstance(a, np.ndarray) and a.flags.writeable else a for a in args]
        result = kernel(*copies)
        outs.append((result, copies[-1]))
    return outs


def _assert_same(pair):
    (r1, o1), (r2, o2) = pair
    np.testing.assert_array_equal(o1, o2)
    if r1 is not None:
        for a, b in zip(r1, r2):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_twins_give_the_same_bits(shape, axis, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layout = _engine.layout_of(shape, axis, x.itemsize)
    v, g = x.reshape(layout.view), dy.reshape(layout.view)
    c = layout.channels
    # Per-channel arrays in the types the engine passes (see _engine._per_channel):
    # parameters and running statistics in x's dtype, batch statistics float64.
    mean, scale, shift = rng.standard_normal((3, c))
    w, rv = rng.uniform(0.5, 2, (2, c))
    p_mean, p_w, p_rv, p_shift = (a.astype(dtype) for a in (mean, w, rv, shift))
    zeros = np.zeros(c, dtype)
    counts, count = layout.counts, float(layout.count)
    out = np.empty_like(v)
    if layout.planes:
        chunk = layout.chunk
        _assert_same([(r, out) for r, _ in _run_both(layout, "plane_moments", v, chunk, counts)])
        for relu, mask in ((False, None), (True, None), (False, v)):
            _assert_same(_run_both(layout, "plane_affine", v, scale, shift, chunk, relu, mask,
                                   False, out))
        for mask in (None, v):
            _assert_same([(r, out) for r, _ in
                          _run_both(layout, "plane_grad_sums", v, g, mask, mean, chunk)])
            _assert_same(_run_both(layout, "plane_grad_input", g, v, mask, scale, shift, mean,
                                   mean, chunk, False, out))
        for by_channel in (False, True):
            _assert_same(_run_both(layout, "plane_train", v, chunk, counts, p_mean.copy(),
                                   p_rv.copy(), 0.1, p_w, p_shift, 1e-5, True, by_channel, False,
                                   out))
            for training in (True, False):
                _assert_same(_run_both(layout, "plane_backward", g, v, v, mean, rv, p_w,
                                       training, chunk, count, by_channel, False, out))
        _assert_same(_run_both(layout, "plane_eval", v, chunk, p_mean, p_rv, p_w, zeros, 1e-5,
                               False, False, out))
    else:
        rpc, inner, blocks = layout.parts, layout.inner, max(2, layout.blocks)
        _assert_same([(r, out) for r, _ in
                      _run_both(layout, "row_moments", v, rpc, c, inner, counts, blocks)])
        for relu, mask in ((False, None), (True, None), (False, v)):
            _assert_same(_run_both(layout, "row_affine", v, scale, shift, c, inner, relu, mask,
                                   out))
        for mask in (None, v):
            _assert_same([(r, out) for r, _ in
                          _run_both(layout, "row_grad_sums", v, g, mask, mean, rpc, c, inner,
                                    blocks)])
            _assert_same(_run_both(layout, "row_grad_input", g, v, mask, scale, shift, mean,
                                   mean, c, inner, out))
        _assert_same(_run_both(layout, "row_train", v, rpc, c, inner, counts, blocks,
                               p_mean.copy(), p_rv.copy(), 0.1, p_w, p_shift, 1e-5, True, out))
        for training in (True, False):
            _assert_same(_run_both(layout, "row_backward", g, v, v, mean, rv, p_w, training, rpc,
                                   c, inner, blocks, count, out))
        _assert_same(_run_both(layout, "row_eval", v, c, inner, p_mean, p_rv, p_w, zeros, 1e-5,
                               False, out))


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_the_task_split_does_not_change_the_bits(shape, axis):
    """Planes: a task per chunk of a plane or per channel; rows: chunks of rows
    cut into any number of blocks of channels. The same bits every way."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    layout = _engine.layout_of(shape, axis, 4)
    k, v, g = _engine.kernels(), x.reshape(layout.view), dy.reshape(layout.view)
    c, rpc, inner, count = layout.channels, layout.parts, layout.inner, layout.count
    ones, zeros, none = np.ones(c, np.float32), np.zeros(c, np.float32), np.empty(0, np.float32)
    results = []
    for split in (False, True) if layout.planes else (1, 2, 3, c):
        out, dx = np.empty_like(v), np.empty_like(v)
        if layout.planes:
            stats = k.plane_train(v, layout.chunk, layout.counts, none, none, 0.1, ones, zeros,
                                  1e-5, False, split, False, out)
            grads = k.plane_backward(g, v, None, stats[0], stats[1], ones, True, layout.chunk,
                                     float(count), split, False, dx)
        else:
            stats = k.row_train(v, rpc, c, inner, layout.counts, split, none, none, 0.1, ones,
                                zeros, 1e-5, False, out)
            grads = k.row_backward(g, v, None, stats[0], stats[1], ones, True, rpc, c, inner,
                                   split, float(count), dx)
        results.append((out, dx) + tuple(stats[:2]) + tuple(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_small_inputs_take_the_serial_twins_large_ones_the_parallel_kernels():
    assert _engine.layout_of((2, 4, 64, 64), 1, 4).serial
    assert not _engine.layout_of((4, 4, 64, 64), 1, 4).serial


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streaming_stores_give_the_same_bits(dtype, offset):
    """Non-temporal stores (large outputs) compute what the plain loops do,
    for any alignment of the output: ReLU, mask, and -0.0/NaN/inf included."""
    k = _engine.kernels()
    rng = np.random.default_rng(3)
    shape = (2, 3, 1000)
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[::7] = 0.0
    x.flat[1::11] = -0.0
    x[0, 1, 5], x[1, 2, 9], x[0, 0, 100] = np.nan, np.inf, -np.inf
    dy, m = rng.standard_normal((2,) + shape).astype(dtype)
    dy.flat[::5] = -0.0
    m.flat[::3] = 0.0
    scale, shift, mean = rng.standard_normal((3, 3))
    shift[1] = -0.0
    for relu, mask in ((False, None), (True, None), (False, m)):
        outs = []
        for stream in (False, True):
            buf = np.full(x.size + offset, 7, dtype)
            out = buf[offset:].reshape(shape)
            k.plane_affine(x, scale, shift, 128, relu, mask, stream, out)
            outs.append(out.view(f"u{x.itemsize}"))
        np.testing.assert_array_equal(*outs)
    for mask in (None, m):
        outs = []
        for stream in (False, True):
            buf = np.full(x.size + offset, 7, dtype)
            out = buf[offset:].reshape(shape)
            k.plane_grad_input(dy, x, mask, scale, shift, mean, mean, 300, stream, out)
            outs.append(out.view(f"u{x.itemsize}"))
        np.testing.assert_array_equal(*outs)


def test_the_input_gradient_loop_over_a_block_of_columns_vectorizes():
    """The rows input gradient loops over a block of columns from its start:
    with a signed index numba tests each for wraparound (a negative index),
    which kept LLVM from vectorizing the loop (2 to 2.9 times the time,
    measured); the loop's index is unsigned. Vectorized, its float32 values
    are widened to float64 a vector at a time. (Compiled here afresh: the
    kernels' cache keeps no LLVM IR.)"""
    from numba import njit
    from nbbn import kernel_loops
    loop = njit(kernel_loops._grad_input_rows.py_func)
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((2, 8, 100)).astype(np.float32)
    a, b, c, mean = rng.standard_normal((4, 100))
    out = np.empty_like(x)
    loop(dy, x, None, a, b, c, mean, 0, 8, 16, 100, out)
    expected = dy * a + (x - mean) * b + c
    np.testing.assert_array_equal(out[:, 16:], expected[:, 16:].astype(np.float32))
    ir = loop.inspect_llvm(loop.signatures[0])
    body = re.search(r"define [^\n]*_grad_input_rows[^\n]*\{(.*?)\n\}", ir, re.S).group(1)
    assert re.search(r"fpext <\d+ x float> .* to <\d+ x double>", body)
