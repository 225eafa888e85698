"""One rank of the SyncBatchNorm checks of tests/test_mpi.py.

Run as ``mpiexec -n P python tests/mpi_scripts/sync_ranks.py`` (or alone, as
one rank). Every rank builds the same global batches, takes its slice of
uneven size (some ranks get none), and checks SyncBatchNorm against
single-process BatchNorm on the whole batch (and the float64 NumPy
reference): outputs, input gradients, gamma/beta gradients summed over
ranks, running statistics; that the running statistics and the reduced
gradients are bitwise equal on every rank; that each training forward and
backward makes exactly one collective and evaluation none; NaN on one rank;
errors on one rank. Any failure aborts every rank (nonzero exit).
"""
import os
import sys
import traceback
import warnings

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import naive  # noqa: E402  (tests/naive.py)

import nbbn  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
N = 12  # samples in the global batch
#: Per-rank sample counts: uneven, and with a rank that has none.
SPLITS = {1: [[12]], 2: [[8, 4], [0, 12]], 3: [[2, 6, 4], [7, 0, 5]]}
#: (sample shape, axis, dtype, momentum, affine, track_running_stats)
CASES = [
    ((3, 9, 11), 1, np.float64, 0.1, True, True),  # planes layout
    ((5,), 1, np.float64, None, True, True),  # rows, cumulative average
    ((4, 3), 1, np.float32, 0.1, True, True),  # short planes read as rows
    ((2, 3, 4), -1, np.float32, 0.2, False, True),  # channels last, no affine
    ((3,), 1, np.float64, 0.1, True, False),  # batch statistics only
]


class CountingComm:
    """A communicator that records every call made through it, except
    ``Get_rank`` and ``Get_size``."""

    def __init__(self, comm):
        self.comm = comm
        self.calls = []

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return self.comm.Get_rank()

    def Get_size(self):  # noqa: N802
        return self.comm.Get_size()

    def __getattr__(self, name):
        attr = getattr(self.comm, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class Checker:
    def __init__(self):
        self.count = 0

    def close(self, actual, expected, what):
        tol = TOL[np.asarray(actual).dtype] if np.asarray(actual).dtype.kind == "f" else 0
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)
        self.count += 1

    def equal(self, actual, expected, what):
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"
        self.count += 1

    def same_on_all_ranks(self, value, what):
        """``value`` (array or number) has the same bits on every rank."""
        data = np.ascontiguousarray(value).tobytes()
        assert all(d == data for d in WORLD.allgather(data)), f"{what} differs across ranks"
        self.count += 1


def rank_sum(v):
    """Sum over ranks, in rank order, of this rank's float vector ``v``."""
    total = np.zeros(np.shape(v))
    for part in WORLD.allgather(np.asarray(v, np.float64)):
        total += part
    return total


def bounds(split):
    lo = sum(split[:RANK])
    return lo, lo + split[RANK]


def layer(rng, c, axis, dtype, momentum, affine, tracking):
    bn = nbbn.BatchNorm(c, momentum=momentum, affine=affine, track_running_stats=tracking,
                        axis=axis, dtype=dtype)
    if affine:
        bn.gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
        bn.beta = rng.standard_normal(c).astype(dtype)
    if tracking:
        bn.running_mean = rng.standard_normal(c).astype(dtype)
        bn.running_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    return bn


def check_case(ck, case, split, seed):
    sample, axis, dtype, momentum, affine, tracking = case
    rng = np.random.default_rng(seed)
    c = sample[axis] if axis == -1 else sample[0]
    ref = layer(rng, c, axis, dtype, momentum, affine, tracking)
    comm = CountingComm(WORLD)
    sync = nbbn.SyncBatchNorm.from_batchnorm(ref, comm)
    lo, hi = bounds(split)
    what = f"rank {RANK} case {case} split {split}"
    for step in range(3):
        x = (rng.standard_normal((N, *sample)) * 2.0 + step).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        y_ref, dx_ref = ref(x), ref.backward(dy)
        y = sync(x[lo:hi])
        ck.equal(comm.take(), ["Allgather"], f"{what}: collectives of a forward")
        dx = sync.backward(dy[lo:hi])
        ck.equal(comm.take(), ["Allgather"], f"{what}: collectives of a backward")
        ck.equal((y.shape, y.dtype, dx.shape, dx.dtype), (x[lo:hi].shape, x.dtype) * 2, what)
        ck.close(y, y_ref[lo:hi], f"{what} step {step}: output")
        ck.close(dx, dx_ref[lo:hi], f"{what} step {step}: input gradient")
        if dtype == np.float64:
            y_np, _, _, mean, invstd = naive.batch_norm(x, None, None, ref.gamma, ref.beta,
                                                        True, axis=axis)
            dx_np = naive.batch_norm_backward(dy, x, mean, invstd, ref.gamma, axis=axis)[0]
            ck.close(y, y_np[lo:hi], f"{what}: output vs NumPy reference")
            ck.close(dx, dx_np[lo:hi], f"{what}: input gradient vs NumPy reference")
        if affine:
            for name in ("grad_gamma", "grad_beta"):
                total = rank_sum(getattr(sync, name))
                ck.same_on_all_ranks(total, f"{what}: {name} summed over ranks")
                ck.close(total.astype(dtype), getattr(ref, name), f"{what}: {name} summed")
        if tracking:
            for name in ("running_mean", "running_var"):
                ck.close(getattr(sync, name), getattr(ref, name), f"{what}: {name}")
                ck.same_on_all_ranks(getattr(sync, name), f"{what}: {name}")
            ck.equal(sync.num_batches_tracked, ref.num_batches_tracked, what)
    if tracking and hi > lo:  # evaluation: plain BatchNorm, nothing sent
        sync.eval(), ref.eval()
        ck.close(sync(x[lo:hi]), ref(x)[lo:hi], f"{what}: eval output")
        ck.close(sync.backward(dy[lo:hi]), ref.backward(dy)[lo:hi], f"{what}: eval gradient")
        ck.equal(comm.take(), [], f"{what}: collectives in evaluation")


def check_nan_rank(ck, split):
    """NaN in the last rank with samples: every rank skips the running update."""
    rng = np.random.default_rng(7)
    ref = layer(rng, 3, 1, np.float64, 0.1, True, True)
    sync = nbbn.SyncBatchNorm.from_batchnorm(ref, WORLD)
    lo, hi = bounds(split)
    x = rng.standard_normal((N, 3))
    x[N - 1, 1] = np.nan
    before = sync.running_mean.copy(), sync.running_var.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = sync(x[lo:hi])
        ref(x)
    ck.equal(sum(issubclass(w.category, RuntimeWarning) and "not finite" in str(w.message)
                 for w in caught), 2, f"rank {RANK}: NaN warnings (sync + reference)")
    ck.equal(sync.num_batches_tracked, 0, "num_batches_tracked after a NaN batch")
    for now, old, name in zip((sync.running_mean, sync.running_var), before, ("mean", "var")):
        ck.equal(now.tobytes(), old.tobytes(), f"running_{name} after a NaN batch")
    ck.equal((np.isnan(y[:, 1]).all(), np.isfinite(y[:, [0, 2]]).all()), (True, True),
             "the NaN channel's outputs are NaN, the others finite, as on one process")
    x[N - 1, 1] = 0.5  # a clean batch updates again, on every rank alike
    sync(x[lo:hi]), ref(x)
    ck.equal(sync.num_batches_tracked, 1, "num_batches_tracked after a clean batch")
    ck.close(sync.running_var, ref.running_var, "running_var after a clean batch")
    ck.same_on_all_ranks(sync.running_var, "running_var after a clean batch")


def expect_error(kind, match, fn):
    try:
        fn()
    except kind as err:
        assert match in str(err), f"{kind.__name__} without {match!r}: {err}"
        return
    raise AssertionError(f"expected {kind.__name__} ({match!r})")


def check_errors(ck):
    """A bad input on one rank: it raises its error, the others a RuntimeError;
    nothing changes anywhere and the layer keeps working."""
    comm = CountingComm(WORLD)
    sync = nbbn.SyncBatchNorm(3, dtype=np.float64, comm=comm)
    x = np.arange(12.0).reshape(4, 3) + RANK
    bad = SIZE - 1
    if RANK == bad:
        expect_error(ValueError, "expected 3 channels", lambda: sync(np.ones((4, 2))))
    else:
        expect_error(RuntimeError, f"rank(s) [{bad}]", lambda: sync(x))
    ck.equal((sync.num_batches_tracked, sync.running_var.tolist()), (0, [1.0] * 3),
             "state after a failed forward")
    ck.equal(comm.take(), ["Allgather"], "a failing rank still joins the collective")
    sample = np.ones((1, 3)) if RANK == 0 else np.ones((0, 3))  # one value per channel
    expect_error(ValueError, "more than 1 value per channel", lambda: sync(sample))
    y = sync(x)
    if RANK == bad:
        expect_error(ValueError, "dy must have shape", lambda: sync.backward(np.ones((2, 3))))
    else:
        expect_error(RuntimeError, "backward failed", lambda: sync.backward(np.ones_like(y)))
    dx = sync.backward(np.ones_like(y))  # the forward's state is intact
    ck.close(dx, np.zeros_like(x), "gradient of a constant dy")
    ck.equal(sync.num_batches_tracked, 1, "num_batches_tracked after errors")


def main():
    ck = Checker()
    splits = SPLITS.get(SIZE) or [[len(a) for a in np.array_split(np.arange(N), SIZE)]]
    assert len(splits[0]) == SIZE, f"no split for {SIZE} ranks"
    for i, case in enumerate(CASES):
        for split in splits:
            check_case(ck, case, split, seed=100 + i)
    check_nan_rank(ck, splits[0])
    check_errors(ck)
    WORLD.Barrier()
    print(f"rank {RANK} of {SIZE}: {ck.count} checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        WORLD.Abort(1)
