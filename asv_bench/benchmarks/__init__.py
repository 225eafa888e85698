"""asv benchmarks of nbbn against a plain NumPy batch norm and PyTorch.

The engines are ``nbbn.programs.bench_engines.ENGINES``, the table ``python -m nbbn
bench`` uses too; threads are pinned (``NBBN_BENCH_THREADS``, default 2) for
numba and torch alike. With ``asv run --python=same`` the installed nbbn is
benchmarked, or, when none is, the checkout this suite lives in.
"""
import os
import sys

THREADS = int(os.environ.get("NBBN_BENCH_THREADS", "2"))
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(THREADS, 1)))

try:
    import nbbn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def pin_threads():
    """Use ``THREADS`` threads in numba (and torch, when installed)."""
    import numba
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(THREADS)
