"""The GPU path under a NumPy without ``np.row_stack`` (NumPy 2.5 removed it;
numba-cuda 0.30.4 names it when it first compiles, numba-cuda issue 907):
either it works or the error names the fix. Each case runs in a fresh
process, with ``row_stack`` deleted from NumPy (and numba told NumPy is 2.5)
before anything imports them.
"""
import importlib.util
import os
import sys
import textwrap

import pytest

from cudasim import REPO, run_bounded

#: NumPy 2.5 as numba sees it: no ``numpy.row_stack``, and numba's own
#: version guards (numba 0.68 registers ``row_stack`` below NumPy 2.5 only).
NO_ROW_STACK = ("import numpy as np\nif hasattr(np, 'row_stack'):\n    del np.row_stack\n"
                "import numba.np.numpy_support\nnumba.np.numpy_support.numpy_version = (2, 5)\n")


def run(code, simulator, tmp_path=None):
    """The output of ``code`` run without ``row_stack`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    if tmp_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    code, out = run_bounded([sys.executable, "-c", NO_ROW_STACK + textwrap.dedent(code)], env)
    assert code == 0, out
    return out


def test_the_gpu_path_runs_without_row_stack():
    """On the simulator (numba's built-in CUDA target, or numba-cuda's)."""
    out = run("""
        import nbbn, numpy as np
        bn = nbbn.BatchNorm(3, device="cuda")
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
        y = bn(x)
        bn.backward(y)
        assert bn.num_batches_tracked == 1 and not hasattr(np, "row_stack")
        x64 = x.astype(np.float64)  # (the CPU path is no part of this: NumPy only)
        ref = (x64 - x64.mean((0, 2), keepdims=True)) / np.sqrt(x64.var((0, 2), keepdims=True)
                                                                + 1e-5)
        np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """, simulator=True)
    assert out.strip().endswith("ok")


#: A stand-in for numba-cuda's array module: it names np.row_stack on import.
NAMES_ROW_STACK = "import numpy as np\nregistered = np.row_stack\n"


@pytest.mark.parametrize("module,works", [(NAMES_ROW_STACK, True),
                                          ("raise AttributeError('np.asfarray')\n", False)])
def test_the_shim_lends_row_stack_for_the_import_only_or_names_the_fix(tmp_path, module,
                                                                       works):
    (tmp_path / "fakecuda").mkdir()
    (tmp_path / "fakecuda" / "__init__.py").write_text("")
    (tmp_path / "fakecuda" / "arrayobj.py").write_text(module)
    out = run(f"""
        import pytest
        from nbbn.gpu import backend
        backend.ARRAYOBJ = "fakecuda.arrayobj"
        if {works}:
            backend._import_numba_cuda()
            import fakecuda.arrayobj
            assert fakecuda.arrayobj.registered is np.vstack
        else:
            with pytest.raises(RuntimeError, match=r"pip install 'numpy<2.5'"):
                backend._import_numba_cuda()
        assert not hasattr(np, "row_stack")
        print("ok")
    """, simulator=False, tmp_path=tmp_path)
    assert out.strip().endswith("ok")


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="needs numba-cuda (pip install 'nbbn[cuda]')")
def test_numba_cuda_compiles_without_row_stack():
    """numba-cuda itself: a kernel compiles to PTX (no GPU needed, but NVVM)
    with the shim, and fails without it."""
    out = run("""
        import importlib
        from numba import cuda, types
        from nbbn.gpu import backend, channel_kernels
        sig = (types.float32[::1], types.float32[::1])
        try:
            cuda.compile_ptx(channel_kernels.copy.py_func, sig, cc=(8, 0))
        except AttributeError as e:  # without the shim
            assert "row_stack" in str(e), e
        else:
            raise AssertionError("numba-cuda compiled without row_stack: the shim can go")
        for name in [m for m in __import__("sys").modules if m.startswith("numba.cuda.np")]:
            del __import__("sys").modules[name]
        backend._import_numba_cuda()
        cuda.compile_ptx(channel_kernels.copy.py_func, sig, cc=(8, 0))
        print("ok")
    """, simulator=False)
    assert out.strip().endswith("ok")
