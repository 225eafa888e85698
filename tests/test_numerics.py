"""Numerical traps, determinism across thread counts, threads, and the cache."""
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

import naive
import nbbn
from nbbn.functional import native_batch_norm


def test_numerical_issues_float32_large_offset():
    """mean 1e5, std 1: E[x^2]-E[x]^2 in float32 would lose every digit."""
    rng = np.random.default_rng(0)
    for shape, axis in [((16, 3, 64, 64), 1), ((4096, 3), -1), ((64, 3, 5), 1)]:
        x = (rng.standard_normal(shape) + 1e5).astype(np.float32)
        _, _, invstd = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, axis=axis)
        var = 1 / invstd**2 - 1e-5
        truth = x.astype(np.float64).var(axis=naive.reduce_axes(x.ndim, axis))
        np.testing.assert_allclose(var, truth, rtol=1e-3)


@pytest.mark.parametrize("shape,axis", [((4, 2, 50, 50), 1), ((4, 2, 5), 1), ((100, 2), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numerical_issues_constant_channel_is_exactly_zero(shape, axis, dtype):
    """torch issue 5410: a constant channel of 1e7 gives +-1 there; here exactly 0."""
    x = np.full(shape, 1e7, dtype)
    bn = nbbn.BatchNorm(2, axis=axis, dtype=dtype)
    y = bn(x)
    assert (y == 0).all()
    np.testing.assert_array_equal(bn.running_mean, np.full(2, 0.1 * 1e7, dtype))


def test_numerical_issues_long_channel():
    """Ten million values in one channel: the merge keeps float64 accuracy."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((10, 1, 1_000_000)) * 3 + 50).astype(np.float32)
    _, mean, invstd = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-12)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, [x64.mean()], rtol=1e-12)
    np.testing.assert_allclose(1 / invstd**2, [x64.var()], rtol=1e-9)


def _exact_var(x):
    """Per-channel variance of (C, n) float64 values, to about 2**-52."""
    mean = [math.fsum(row) / row.size for row in x]
    return np.array([math.fsum((row - m) ** 2) / row.size for row, m in zip(x, mean)])


@pytest.mark.parametrize("shape,axis", [((1, 2, 4096), 1), ((3001, 2), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"])
def test_one_pass_moments_lose_at_most_pivot_bits(shape, axis, dtype):
    """Statistics are one pass about a pivot, a value of each block: a pivot
    far from the rest (an outlier first in a block of thousands) would lose
    up to log2(n) bits of the variance; past PIVOT_BITS the block is read again
    in two passes. Planes blocks of 2048, and one chunk of 3001 rows; half
    elements take the same passes (through their 16-bit views)."""
    from nbbn import _engine, kernel_loops
    from nbbn._validation import kernel_view
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype)
    first = (0, slice(None), 0) if axis == 1 else (0, slice(None))
    x[first] = 1e4  # the pivots of the first block (row chunk) of every channel
    if axis == 1:
        x[0, :, kernel_loops.BLOCK] = -1e4  # and of the second block
    layout = _engine.layout_of(x.shape, axis % x.ndim, x.itemsize)
    assert layout.serial and (layout.planes == (axis == 1))
    _, var = _engine.moments(kernel_view(np.ascontiguousarray(x)), layout)
    cols = np.moveaxis(x, axis, 0).reshape(shape[axis], -1).astype(np.float64)
    truth = _exact_var(cols)
    # 1.6e-15 at most here; 2.2e-13 to 4.1e-12 without the second read (measured)
    assert np.abs(var / truth - 1).max() <= 2.0 ** -45


THREADED = textwrap.dedent("""
    from concurrent.futures import ThreadPoolExecutor
    import numba, numpy as np, nbbn
    x = np.random.default_rng(0).standard_normal((16, 8, 32, 32)).astype(np.float32)
    def work(i):
        bn = nbbn.BatchNorm(8)
        y = bn(x)
        return y, bn.backward(y)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(64)))
    # after the threads, so that they compile the kernels (this call reuses them)
    y, dx = work(None)
    ok = all(np.array_equal(r[0], y) and np.array_equal(r[1], dx) for r in results)
    print(ok, numba.threading_layer())
""")


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    """A numba cache folder the first test using it finds empty: its kernels
    compile in the threads that call them first."""
    return str(tmp_path_factory.mktemp("numba_cache"))


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_calls_from_many_python_threads(cold_cache, layer):
    env = dict(os.environ, NUMBA_CACHE_DIR=cold_cache)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    result = subprocess.run([sys.executable, "-c", THREADED], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ok, used = result.stdout.split()
    assert ok == "True"
    if layer:
        assert used == layer


def test_calls_from_threads_in_process():
    x = np.random.default_rng(0).standard_normal((4, 3, 20, 20))
    expected = nbbn.batch_norm(x, training=True)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: nbbn.batch_norm(x, training=True), range(16)))
    for r in results:
        np.testing.assert_array_equal(r, expected)


CACHED = textwrap.dedent("""
    import numpy as np, nbbn
    from nbbn import kernels
    bn = nbbn.BatchNorm(4).eval()
    # Large enough for the parallel kernels (small inputs run their serial twins); an
    # evaluation, the parallel kernel quickest to compile (7 s, training and backward 40).
    x = np.random.default_rng(0).standard_normal((8, 4, 64, 64)).astype(np.float32)
    y = bn(x)
    print(sum(kernels.plane_eval.stats.cache_hits.values()), float(np.abs(y).sum()))
""")


def test_kernels_cached_by_one_process_run_in_a_fresh_one(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", CACHED], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    first, second = (r.stdout.split() for r in runs)
    assert first[0] == "0" and second[0] == "1"
    assert first[1] == second[1]


def test_an_edit_to_a_loop_module_recompiles_the_kernels_that_call_it(tmp_path):
    """numba stamps a cached function with its own file only: a kernel of
    kernels.py calling an edited loop of kernel_loops.py would load stale code."""
    package = tmp_path / "nbbn"
    shutil.copytree(Path(nbbn.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / "kernel_loops.py", "a") as f:
        f.write("\n\n@njit\ndef _probe():\n    return 1\n")
    with open(package / "kernels.py", "a") as f:
        f.write("\n\nfrom .kernel_loops import _probe\n\n\n"
                "@njit(cache=True)\ndef probe():\n    return _probe()\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    code = "from nbbn import kernels; print(kernels.probe(), sum(kernels.probe.stats.cache_hits.values()))"

    def run():
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert run() == ["1", "0"] and run() == ["1", "1"]  # compiled, then loaded
    loops = package / "kernel_loops.py"
    loops.write_text(loops.read_text().replace("return 1\n", "return 2\n"))
    assert run() == ["2", "0"] and run() == ["2", "1"]


NO_CACHE_FOLDER = textwrap.dedent("""
    from numba.core import caching
    # As with a read-only site-packages and no writable home: only NUMBA_CACHE_DIR is left.
    caching.CacheImpl._locator_classes = [caching.UserProvidedCacheLocator]
    import numba, numpy as np, nbbn
    c = np.zeros(4), np.ones(4)  # an evaluation: the quickest kernel to compile
    y = nbbn.batch_norm(np.random.default_rng(0).standard_normal((8, 4, 64, 64)), *c)
    print(numba.config.CACHE_DIR, float(np.abs(y).sum()))
""")


def test_no_writable_cache_folder_falls_back_to_the_temporary_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", NO_CACHE_FOLDER], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cache_dir = result.stdout.split()[0]
    assert cache_dir.startswith(str(tmp_path))
    assert any(p.suffix == ".nbi" for p in Path(cache_dir).rglob("*"))


def test_set_num_threads_is_honoured():
    x = np.random.default_rng(0).standard_normal((8, 4, 30, 30))
    full = nbbn.batch_norm(x, training=True)
    default = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(nbbn.batch_norm(x, training=True), full)
    finally:
        numba.set_num_threads(default)
