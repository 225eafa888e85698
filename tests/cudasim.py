"""Running the GPU tests without a GPU, on numba's CUDA simulator.

The simulator must be switched on (``NUMBA_ENABLE_CUDASIM=1``) before numba is
imported. So a test file of the GPU path imports from here: with the variable
set, or on a machine with a GPU, its tests marked :data:`here` run in the test
process; otherwise they skip there, and the file's ``test_simulator_run``
(made by :func:`simulator_run`) runs the file again in a subprocess with the
variable set. A plain ``python -m pytest`` thus always runs them.

Importing :func:`small_launch` and :func:`fast_switching` into a test file
makes them autouse there: launch constants patched small, so that the
simulator (one Python thread per CUDA thread) stays fast and every merge path
is exercised, and a short GIL switch interval, since the simulator's threads
meet at every ``syncthreads``. The :func:`activity` fixture counts what calls
do with the (simulated) device.
"""
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbbn.gpu import backend as _cuda

REPO = Path(__file__).resolve().parents[1]
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _gpu_present():
    if SIMULATOR:
        return False
    from numba import cuda
    return cuda.is_available()


GPU = _gpu_present()
#: Mark of the tests that need numba.cuda (a GPU or the simulator in this process).
here = pytest.mark.skipif(not (SIMULATOR or GPU), reason="runs in test_simulator_run's subprocess")
#: Mark of a GPU test file's CPU tests: skipped in the simulator's subprocess, which
#: re-runs the file for its GPU tests after the parent process has run these.
cpu = pytest.mark.skipif(SIMULATOR and not GPU, reason="ran in the parent process")


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    monkeypatch.setattr(_cuda, "THREADS_PER_BLOCK", 2)
    monkeypatch.setattr(_cuda, "LANES", 4)
    monkeypatch.setattr(_cuda, "ELEMENTS_PER_LANE", 4)


@pytest.fixture(autouse=True, scope="module")
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def gpu_forward(x, *args, **kwargs):
    """``native_batch_norm`` with ``x`` copied to the device: device arrays out
    (NumPy running statistics are updated in place)."""
    from nbbn.functional import native_batch_norm
    return native_batch_norm(_cuda.to_device(x), *args, **kwargs)


def gpu_backward(dy, x, *args, y=None, **kwargs):
    """``batch_norm_backward`` with ``dy`` and ``x`` copied to the device."""
    from nbbn.functional import batch_norm_backward
    return batch_norm_backward(_cuda.to_device(dy), _cuda.to_device(x), *args,
                               y=None if y is None else _cuda.to_device(y), **kwargs)


def host(a):
    """A NumPy array of ``a``, wherever it is."""
    return a.copy_to_host() if _cuda.is_device_array(a) else a


#: Seconds a subprocess of the GPU tests may take before it counts as hung: a guard
#: against a hang, not a time limit. Unloaded, the simulator runs of a test file take 1-2
#: minutes; on a machine loaded several times over, or compiling with a cold cache, many
#: more.
HANG_SECONDS = 1800


def run_bounded(args, env, timeout=HANG_SECONDS):
    """Run ``args`` from the repository root; ``(returncode, output)``, stdout and stderr
    merged. On a hang (``timeout``), kill it and fail the test with the output so far,
    so that the log says where it stopped."""
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"hung: {' '.join(map(str, args))} ran over {timeout} s; its output:\n"
                    f"{out[-8000:]}")
    return proc.returncode, out


def simulator_run(test_file, min_passed):
    """The ``test_simulator_run`` of ``test_file``: it runs that file in a
    subprocess with ``NUMBA_ENABLE_CUDASIM=1`` and asserts that at least
    ``min_passed`` tests passed there and none failed. It skips where the
    tests run in the test process itself. On a failure, the message holds the
    subprocess's report: every test's outcome, the failures' tracebacks, and
    the slowest tests."""
    path = Path(test_file).resolve().relative_to(REPO)

    @pytest.mark.skipif(SIMULATOR or GPU, reason="the tests run in this process")
    def test_simulator_run():
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        code, out = run_bounded([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                 "-n", "0", "--durations=5", str(path)], env)
        summary = out.strip().splitlines()[-1] if out.strip() else ""
        assert code == 0, out[-12000:]
        passed = re.search(r"(\d+) passed", summary)
        assert passed and int(passed.group(1)) >= min_passed, out[-12000:]
        assert " failed" not in summary, out[-12000:]
        print(summary)  # shown with -rA: what ran there

    return test_simulator_run


def assert_same(a, b):
    """Bitwise equality of NumPy or device arrays."""
    np.testing.assert_array_equal(host(a), host(b))


@pytest.fixture
def activity(monkeypatch):
    """:func:`count_activity` for the test."""
    return count_activity(monkeypatch)


def count_activity(monkeypatch):
    """A ``collections.Counter`` of what the host does with the simulated
    device from now on (until ``monkeypatch`` undoes its patches):
    ``launches`` (kernels), ``allocations`` (device or pinned arrays:
    ``device_array`` and the like, ``to_device`` without ``to=``), ``reads``
    (device to host: ``copy_to_host``, reading an element, NumPy's array
    interfaces), ``writes`` (host to device into an existing array) and
    ``syncs``. Kernels' own accesses are not counted."""
    from numba import cuda
    from numba.cuda.simulator import kernel
    from numba.cuda.simulator.cudadrv import devicearray

    counts = collections.Counter()

    def host():
        return kernel._get_kernel_context() is None

    def counted(what, fn, when=lambda *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            if host() and when(*args, **kwargs):
                counts[what] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("device_array", "device_array_like", "mapped_array", "managed_array",
                 "pinned_array", "pinned_array_like"):
        if hasattr(cuda, name):
            monkeypatch.setattr(cuda, name, counted("allocations", getattr(cuda, name)))
    monkeypatch.setattr(cuda, "to_device", counted("allocations", cuda.to_device,
                                                   lambda *a, to=None, **k: to is None))
    monkeypatch.setattr(cuda, "synchronize", counted("syncs", cuda.synchronize))
    fake = devicearray.FakeCUDAArray
    monkeypatch.setattr(fake, "copy_to_host", counted("reads", fake.copy_to_host))
    monkeypatch.setattr(fake, "copy_to_device", counted("writes", fake.copy_to_device))
    getitem, getattr_ = fake.__getitem__, fake.__getattr__

    def get_item(self, index):
        item = getitem(self, index)
        if host() and not isinstance(item, fake):
            counts["reads"] += 1
        return item

    def get_attr(self, name):
        if host() and name in ("__array__", "__array_interface__", "__array_struct__"):
            counts["reads"] += 1
        return getattr_(self, name)

    monkeypatch.setattr(fake, "__getitem__", get_item)
    monkeypatch.setattr(fake, "__getattr__", get_attr)
    call = kernel.FakeCUDAKernel.__call__

    def launch(self, *args):
        if not self._device:
            counts["launches"] += 1
        return call(self, *args)

    monkeypatch.setattr(kernel.FakeCUDAKernel, "__call__", launch)
    return counts
