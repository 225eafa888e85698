"""The threading layer (nbbn/_threads.py): TBB by default where the tbb wheel is
installed, a user's choice honoured, a clear warning where numba ends up on GNU
OpenMP, and multiprocessing pools (fork, spawn, forkserver) that work after the
parent ran the parallel kernels. Each case runs in a fresh interpreter, with a
timeout: a hung pool fails the test instead of hanging the suite."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 120
HAS_TBB = importlib.util.find_spec("numba") is not None and any(
    os.path.exists(os.path.join(p, "lib", "libtbb.so.12")) for p in (sys.prefix,))
needs_tbb = pytest.mark.skipif(not HAS_TBB or not sys.platform.startswith("linux"),
                               reason="the tbb wheel is not installed here")

#: A parallel-sized training forward in the parent, then a pool whose workers
#: run the same forward (and a backward); the children's results must equal the
#: parent's bit for bit. ``PRELUDE`` runs first (before ``import nbbn``).
POOL = """
import multiprocessing as mp, sys, warnings
import numpy as np
{prelude}
import nbbn, numba
from nbbn import _threads

def step(seed):
    x = np.random.default_rng(seed).standard_normal((128, 32, 40)).astype(np.float32)
    bn = nbbn.BatchNorm(32)
    y = bn(x)
    return y, bn.backward(np.ones_like(y) * 0.5), bn.running_var

if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parent = [step(s) for s in range(3)]
    with mp.get_context("{method}").Pool(2) as pool:
        children = pool.map(step, range(3))
    same = all(np.array_equal(a, b) for p, c in zip(parent, children) for a, b in zip(p, c))
    print("layer", numba.threading_layer(), "same", same)
    print("warnings", len([w for w in caught if "threading layer" in str(w.message)]))
"""


def run_python(code, env=None, cwd=None):
    """Run ``code`` as a script in a fresh interpreter; return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_pool(tmp_path, method, prelude="", env=None):
    script = tmp_path / "pool_script.py"  # spawn and forkserver re-import the main module
    script.write_text(POOL.format(prelude=textwrap.dedent(prelude), method=method))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


@needs_tbb
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pools_after_parallel_kernels_on_tbb(tmp_path, method):
    out = run_pool(tmp_path, method)
    assert out["layer"] == "tbb same True"
    assert out["warnings"] == "0"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pools_on_gnu_openmp_the_user_chose(tmp_path, method):
    """GNU OpenMP aborts forked children that enter it: nbbn runs its serial
    kernels there instead (the same bits), and says nothing (the user chose)."""
    out = run_pool(tmp_path, method, env={"NUMBA_THREADING_LAYER": "omp"})
    assert out["layer"] == "omp same True"
    assert out["warnings"] == "0"


def test_numba_started_openmp_before_nbbn(tmp_path):
    """Another parallel numba function ran first and numba took OpenMP: nbbn
    keeps it, warns once with the reason, and fork pools still work."""
    prelude = """
        from numba import njit, prange
        @njit(parallel=True)
        def first(a):
            for i in prange(a.size):
                a[i] += 1.0
        first(np.zeros(10000))
    """
    out = run_pool(tmp_path, "fork", prelude=prelude)
    assert out["layer"] == "omp same True"
    assert out["warnings"] == "1"


def test_missing_tbb_falls_back_with_a_warning():
    """Where the TBB library cannot be loaded, numba falls back to OpenMP and
    nbbn says why, once; results are unchanged."""
    code = textwrap.dedent("""
        import ctypes, warnings
        real = ctypes.CDLL
        class NoTBB(real):
            def __init__(self, name, *args, **kwargs):
                if name and "tbb" in str(name):
                    raise OSError(f"{name}: cannot open shared object file (simulated)")
                super().__init__(name, *args, **kwargs)
        ctypes.CDLL = NoTBB
        import numpy as np, numba, nbbn
        from nbbn import _threads
        x = np.random.default_rng(0).standard_normal((128, 32, 40)).astype(np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = nbbn.batch_norm(x, training=True)
            y2 = nbbn.batch_norm(x, training=True)
        print(numba.threading_layer(), len(caught), np.array_equal(y, y2))
        print(caught[0].message)
    """)
    first, message = run_python(code).splitlines()[:2]
    assert first == "omp 1 True"
    assert "GNU OpenMP" in message and "NUMBA_THREADING_LAYER" in message
    assert ("not installed" in message or "simulated" in message), message


@needs_tbb
def test_tbb_is_the_default_and_import_stays_light():
    code = textwrap.dedent("""
        import sys
        import nbbn
        assert "numba" not in sys.modules  # import nbbn loads TBB, not numba
        import numpy as np, numba
        nbbn.batch_norm(np.ones((128, 32, 40), np.float32), training=True)
        print(numba.threading_layer(), nbbn._threads.lock, nbbn._threads.tbb_problem)
    """)
    assert run_python(code).split() == ["tbb", "None", "None"]


def test_a_chosen_layer_is_honoured():
    code = ("import numpy as np, numba, nbbn\n"
            "nbbn.batch_norm(np.ones((128, 32, 40), np.float32), training=True)\n"
            "print(numba.threading_layer(), nbbn._threads.lock is None)")
    assert run_python(code, env={"NUMBA_THREADING_LAYER": "workqueue"}).split() == [
        "workqueue", "False"]


#: Every layout at 1, 2, 3, 4 and 8 threads (teams of 1 to 8 on the same
#: plans): planes (a task per channel for small teams, per chunk of a plane
#: for 3 channels), rows (N, C), channels-last, 3-D rows with inner elements,
#: 5-D both ways; many short rows, few long ones (2 x 2 and 3 x 3 planes:
#: the output passes' blocks of columns), and inputs small enough for the serial
#: twins. The same bits every time, and the caller's thread count
#: as it was after every call.
EVERY_TEAM = """
import numba, numpy as np, nbbn
cases = [((8, 32, 32, 32), 1), ((4, 3, 50000), 1), ((512, 600), 1), ((16, 20, 20, 48), -1),
         ((256, 32, 40), 1), ((4, 8, 4, 32, 32), 1), ((4, 6, 8, 10, 64), -1),
         ((8000, 24), 1), ((7, 9, 9, 5), -1), ((6, 5, 30), 1), ((16, 2048, 2, 2), 1),
         ((2, 8192, 3, 3), 1)]
digests, restored = [], True
for threads in (1, 2, 3, 4, 8):
    numba.set_num_threads(threads)
    out = []
    for shape, axis in cases:
        rng = np.random.default_rng(1)
        x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        bn = nbbn.BatchNorm(shape[axis], axis=axis)
        bn.gamma[:] = rng.uniform(0.5, 2, shape[axis])
        y = bn(x)
        dx = bn.backward(dy)
        bn.eval()
        out += [y, dx, bn.grad_gamma, bn.grad_beta, bn.running_mean, bn.running_var, bn(x)]
        restored &= numba.get_num_threads() == threads
    digests.append(b"".join(a.tobytes() for a in out))
print(len(set(digests)), restored, numba.threading_layer())
"""


def test_bitwise_identical_for_every_team():
    out = run_python(EVERY_TEAM, env={"NUMBA_NUM_THREADS": "8"}).split()
    assert out[:2] == ["1", "True"], out


#: The thread count nbbn reads and sets through the layer's own functions is
#: numba's: what either sets, the other reads (in a thread of its own too,
#: where numba's count is per thread).
COUNTS = """
import threading, numba
from nbbn import _threads
get, put = _threads.thread_count_functions()
seen = [get() == numba.get_num_threads() == 4]
for n in (1, 3, 4):
    put(n)
    seen.append(numba.get_num_threads() == n)
    numba.set_num_threads(5 - n)
    seen.append(get() == 5 - n)
def other():
    seen.append(get() == 4)
    put(2)
    seen.append(numba.get_num_threads() == 2)
t = threading.Thread(target=other)
t.start(); t.join()
seen.append(get() == numba.get_num_threads() == 1)
print(all(seen), len(seen))
"""


def test_thread_count_functions_are_numbas():
    assert run_python(COUNTS, env={"NUMBA_NUM_THREADS": "4"}).split() == ["True", "10"]
