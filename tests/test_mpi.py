"""SyncBatchNorm: synchronized batch norm over MPI.

Two kinds of test. In-process ones run everywhere: ranks simulated by threads
that share an ``Allgather`` (ThreadComm), checked against single-process
BatchNorm on the whole batch. The MPI ones launch ``mpiexec -n 2`` and ``-n 3``
on tests/mpi_scripts/sync_ranks.py, and the example over two processes; they
need the ``mpi`` extra (mpi4py, and MPICH whose mpiexec lands beside python)
and skip, saying so, without it.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import nbbn
from conftest import ATOL, DTYPES, RTOL, SHAPES, random_input

REPO = Path(__file__).resolve().parents[1]
RANK_SCRIPT = REPO / "tests" / "mpi_scripts" / "sync_ranks.py"


class ThreadComm:
    """One rank of an in-process group of ``size`` threads: ``Allgather``
    meets the other threads at a barrier. Counts its collectives."""

    def __init__(self, rank, size, slots, barrier):
        self.rank, self.size, self.slots, self.barrier = rank, size, slots, barrier
        self.collectives = 0

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def Allgather(self, send, recv):  # noqa: N802
        self.collectives += 1
        self.slots[self.rank] = np.array(send, dtype=np.float64)
        self.barrier.wait()
        recv[...] = np.stack(self.slots)
        self.barrier.wait()


def thread_comms(size):
    slots, barrier = [None] * size, threading.Barrier(size, timeout=60)
    return [ThreadComm(r, size, slots, barrier) for r in range(size)]


def on_ranks(comms, fn):
    """``[fn(comm) for comm in comms]``, each in its own thread, as ranks."""
    with ThreadPoolExecutor(len(comms)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(fn, c) for c in comms]]


def split_bounds(n):
    """Three uneven slices of ``n`` samples; the middle rank gets none."""
    k = max(1, n // 3)
    return [(0, k), (k, k), (k, n)]


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_import_nbbn_does_not_import_mpi4py():
    code = ("import sys, nbbn; nbbn.SyncBatchNorm; from nbbn import sync; "
            "print('mpi4py' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_default_comm_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(ImportError, match=r"nbbn\[mpi\]"):
        nbbn.SyncBatchNorm(3)


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="Allgather"):
        nbbn.SyncBatchNorm(3, comm=object())


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_ranks_match_batchnorm_on_the_whole_batch(rng, shape, axis, dtype):
    c, n = shape[axis], shape[0]
    x, dy = random_input(rng, shape, dtype), random_input(rng, shape, dtype)
    ref = nbbn.BatchNorm(c, momentum=0.3, axis=axis, dtype=dtype)
    ref.gamma[:] = rng.uniform(0.5, 1.5, c)
    ref.beta[:] = rng.standard_normal(c)
    comms = thread_comms(3)
    layers = [nbbn.SyncBatchNorm.from_batchnorm(ref, comm) for comm in comms]
    y_ref, dx_ref = ref(x), ref.backward(dy)

    def rank(comm):
        lo, hi = split_bounds(n)[comm.rank]
        bn = layers[comm.rank]
        y = bn(x[lo:hi])
        dx = bn.backward(dy[lo:hi])
        return lo, hi, y, dx

    results = on_ranks(comms, rank)
    for (lo, hi, y, dx), bn, comm in zip(results, layers, comms):
        assert y.shape == dx.shape == x[lo:hi].shape and y.dtype == dx.dtype == dtype
        assert_close(y, y_ref[lo:hi], dtype)
        assert_close(dx, dx_ref[lo:hi], dtype)
        assert comm.collectives == 2  # one forward, one backward
        for name in ("running_mean", "running_var"):
            assert_close(getattr(bn, name), getattr(ref, name), dtype)
            assert getattr(bn, name).tobytes() == getattr(layers[0], name).tobytes()
        assert bn.num_batches_tracked == 1
    for name in ("grad_gamma", "grad_beta"):
        total = sum(getattr(bn, name).astype(np.float64) for bn in layers)
        assert_close(total, getattr(ref, name), dtype)


def test_one_collective_per_forward_and_backward_none_in_eval(rng):
    x = rng.standard_normal((8, 4, 5))
    comms = thread_comms(2)

    def rank(comm):
        bn = nbbn.SyncBatchNorm(4, momentum=None, dtype=np.float64, comm=comm)
        counts = []
        for _ in range(3):
            bn(x[comm.rank::2])
            counts.append(comm.collectives)
            bn.backward(np.ones((4, 4, 5)))
            counts.append(comm.collectives)
        bn.eval()
        bn.backward(bn(x))
        counts.append(comm.collectives)
        return counts, bn.running_var

    for counts, running_var in on_ranks(comms, rank):
        assert counts == [1, 2, 3, 4, 5, 6, 6]
        # momentum=None: the cumulative average of three equal batch variances
        expected = np.concatenate([x[0::2], x[1::2]]).var(axis=(0, 2), ddof=1)
        np.testing.assert_allclose(running_var, expected, rtol=1e-12)


def test_a_bad_input_on_one_rank_raises_on_every_rank_and_changes_nothing(rng):
    x = rng.standard_normal((6, 3))
    comms = thread_comms(2)
    layers = [nbbn.SyncBatchNorm(3, dtype=np.float64, comm=comm) for comm in comms]

    def rank(comm):
        bn = layers[comm.rank]
        bad = x[:, :2] if comm.rank == 1 else x  # wrong channel count on rank 1
        try:
            bn(bad)
        except (ValueError, RuntimeError) as err:
            return type(err), str(err), comm.collectives

    (kind0, msg0, calls0), (kind1, msg1, calls1) = on_ranks(comms, rank)
    assert (kind0, kind1) == (RuntimeError, ValueError)
    assert "rank(s) [1]" in msg0 and "expected 3 channels" in msg1
    assert calls0 == calls1 == 1  # the failing rank still joined the collective
    for bn in layers:
        assert bn.num_batches_tracked == 0 and bn._saved is None
        assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()


def test_a_bad_dy_on_one_rank_raises_on_every_rank_and_keeps_the_forward(rng):
    x = rng.standard_normal((6, 3))
    comms = thread_comms(2)

    def rank(comm):
        bn = nbbn.SyncBatchNorm(3, dtype=np.float64, comm=comm)
        y = bn(x[3 * comm.rank:3 * comm.rank + 3])
        bad = np.ones((2, 3)) if comm.rank == 0 else np.ones_like(y)
        with pytest.raises(ValueError if comm.rank == 0 else RuntimeError):
            bn.backward(bad)
        return bn.backward(y), comm.collectives  # dy = y: a valid retry

    ref = nbbn.BatchNorm(3, dtype=np.float64)
    dx_ref = ref.backward(ref(x))
    (dx0, calls0), (dx1, calls1) = on_ranks(comms, rank)
    np.testing.assert_allclose(np.concatenate([dx0, dx1]), dx_ref, rtol=1e-12, atol=1e-12)
    assert calls0 == calls1 == 3


def test_a_global_batch_of_one_value_per_channel_is_an_error_on_every_rank():
    comms = thread_comms(3)

    def rank(comm):
        bn = nbbn.SyncBatchNorm(2, comm=comm)
        x = np.ones((1, 2) if comm.rank == 0 else (0, 2), np.float32)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(x)
        return bn.num_batches_tracked

    assert on_ranks(comms, rank) == [0, 0, 0]


def test_empty_slice_needs_the_channel_axis():
    comm = thread_comms(1)[0]
    bn = nbbn.SyncBatchNorm(3, comm=comm)
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(np.ones((0, 2), np.float32))
    assert bn.eval()(np.ones((0, 3), np.float32)).shape == (0, 3)  # as BatchNorm: no values
    assert comm.collectives == 1


def test_from_batchnorm_copies_settings_state_and_mode(rng):
    bn = nbbn.BatchNorm(4, eps=1e-3, momentum=None, axis=-1, dtype=np.float64).eval()
    bn.gamma[:], bn.running_var[:] = rng.uniform(1, 2, 4), rng.uniform(1, 2, 4)
    bn.num_batches_tracked = 7
    sync = nbbn.SyncBatchNorm.from_batchnorm(bn, thread_comms(1)[0])
    assert repr(sync) == "Sync" + repr(bn)
    assert not sync.training and sync.num_batches_tracked == 7
    assert (sync.eps, sync.momentum, sync.axis, sync.dtype) == (1e-3, None, -1, np.float64)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(sync.state_dict()[key], value)
    assert not np.shares_memory(sync.gamma, bn.gamma)
    x = rng.standard_normal((5, 4))
    np.testing.assert_array_equal(sync(x), bn(x))  # eval: plain BatchNorm
    with pytest.raises(TypeError, match="BatchNorm"):
        nbbn.SyncBatchNorm.from_batchnorm(object(), thread_comms(1)[0])
    with pytest.raises(TypeError, match="BatchRenorm"):  # other math: not converted silently
        nbbn.SyncBatchNorm.from_batchnorm(nbbn.BatchRenorm(4), thread_comms(1)[0])
    ghost = nbbn.SyncBatchNorm.from_batchnorm(nbbn.BatchNorm(4, virtual_batch_size=2),
                                              thread_comms(1)[0])  # options compose
    assert ghost.virtual_batch_size == 2
    again = nbbn.SyncBatchNorm.from_batchnorm(sync, thread_comms(1)[0])  # a new comm
    assert repr(again) == repr(sync)


def test_out_is_written_and_an_overwritten_input_stops_the_backward(rng):
    x = rng.standard_normal((6, 3))
    comms = thread_comms(2)

    def rank(comm):
        bn = nbbn.SyncBatchNorm(3, dtype=np.float64, comm=comm)
        mine = x[3 * comm.rank:3 * comm.rank + 3].copy()
        out = np.empty_like(mine)
        assert bn(mine, out=out) is out
        y = out.copy()
        bn(mine, out=mine)  # in place: fine for the forward
        np.testing.assert_array_equal(mine, y)
        with pytest.raises(RuntimeError, match="overwritten"):
            bn.backward(np.ones_like(mine))
        return y, comm.collectives

    ref = nbbn.BatchNorm(3, dtype=np.float64)
    (y0, calls0), (y1, calls1) = on_ranks(comms, rank)
    np.testing.assert_allclose(np.concatenate([y0, y1]), ref(x), rtol=1e-12, atol=1e-12)
    assert calls0 == calls1 == 3


# --- real MPI: mpiexec -n 2 and -n 3 ---------------------------------------------------

def mpiexec():
    """mpiexec beside this Python (where the mpich wheel puts it), else on PATH."""
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def run_bounded(args, env, timeout):
    """Run ``args``; on timeout kill it with every rank it started."""
    proc = subprocess.Popen([str(a) for a in args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} timed out after {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def mpi_env():
    """Environment for rank processes, with numba's cache already filled.

    The ranks share numba's cache with the tests (the kernels this process
    compiled are there already); the rank script first runs alone (one rank,
    no mpiexec) and compiles any other kernel the ranks need, so that they
    load them instead of each compiling them at once.
    """
    pytest.importorskip("mpi4py", reason="mpi4py is not installed: pip install 'nbbn[mpi]' "
                                         "to run the MPI tests")
    if mpiexec() is None:
        pytest.skip("no mpiexec beside the Python interpreter or on PATH: "
                    "pip install 'nbbn[mpi]' to run the MPI tests")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, NUMBA_NUM_THREADS="1")
    out = run_bounded([sys.executable, RANK_SCRIPT], env, timeout=300)
    assert "rank 0 of 1:" in out, out
    return env


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_over_mpiexec(mpi_env, ranks):
    out = run_bounded([mpiexec(), "-n", ranks, sys.executable, RANK_SCRIPT], mpi_env,
                      timeout=180)
    for r in range(ranks):
        assert f"rank {r} of {ranks}:" in out, out


def test_example_trains_over_two_processes_like_one(mpi_env):
    out = run_bounded([mpiexec(), "-n", 2, sys.executable, "-m", "nbbn.programs.mpi_mlp",
                       "--steps", 20], mpi_env, timeout=180)
    assert "MATCH: data-parallel training over 2 process(es) matches" in out, out
