"""Every combination of the layer template's parts works: the statistics (the
batch, ghost groups with ``virtual_batch_size``, all ranks with ``comm``), the
correction (``BatchRenorm``), the fused ReLU and the backend (``device``).

1. The table: BatchNorm, BatchRenorm, SyncBatchNorm and BatchRenorm(comm=) over
   two ThreadComm ranks, times every subset of {relu, ghost, cuda}: training steps
   and an evaluation step against a float64 NumPy model built from tests/naive.py
   (outputs, input gradients, per-rank and total grad_gamma/grad_beta, running
   statistics, num_batches_tracked, collectives). A GPU layer is also checked
   against the same layer on the CPU, step by step (conftest's tolerances), and
   layers moved between the devices by ``.to()`` in mid-training.
2. BatchRenorm(rmax=1, dmax=0) is bitwise BatchNorm, with ghost batches, ReLU,
   both, over ranks, and on the GPU.
3. Synchronized layers over 2 and 3 ranks (uneven and empty slices) equal the
   single-process layer on the whole batch; with ghost batches, on the batch laid
   out group by group: [rank0 group0, rank1 group0, ..., rank0 group1, ...]; one
   collective per ghost group and pass. A few cases with the ranks on the GPU.
4. Bad input to a composed layer changes nothing, on any rank; a synchronized
   ghost batch that cannot be formed (ranks with different numbers of groups, one
   value per channel) is refused on every rank.

GPU cases run on numba's CUDA simulator (see tests/cudasim.py): marked ``here``,
in this process on a GPU or with NUMBA_ENABLE_CUDASIM=1, otherwise in
``test_simulator_run``'s subprocess. That subprocess runs the GPU cases only:
the CPU ones (marked ``cpu``) have run in the parent process already. The
simulator runs one kernel at a time, so synchronized GPU ranks take turns
(:class:`LockstepComm`).
"""
import contextlib
import itertools
import threading

import numpy as np
import pytest

import nbbn
from conftest import ATOL, DTYPES, RTOL, assert_unchanged, random_input, snapshot
from cudasim import (cpu, fast_switching, here, host, simulator_run,  # noqa: F401
                     small_launch)
from naive import (batch_norm, batch_norm_backward, batch_renorm, batch_renorm_backward,
                   per_channel, reduce_axes)
from test_mpi import ThreadComm, on_ranks, thread_comms

test_simulator_run = simulator_run(__file__, min_passed=49)

MOMENTUM = 0.3
RMAX, DMAX = 1.5, 0.5  # small, so that r and d are clipped on the skewed batches


# --- ranks ---------------------------------------------------------------------------

class LockstepComm(ThreadComm):
    """A ThreadComm rank that runs only while it holds its group's lock, and
    lets go of it inside ``Allgather``: the ranks take turns between
    collectives (numba's CUDA simulator refuses concurrent kernels)."""

    def __init__(self, rank, size, slots, barrier, lock):
        super().__init__(rank, size, slots, barrier)
        self.lock = lock

    def Allgather(self, send, recv):  # noqa: N802 - mpi4py's name
        self.lock.release()
        try:
            super().Allgather(send, recv)
        finally:
            self.lock.acquire()


def lockstep_comms(size):
    slots, barrier, lock = [None] * size, threading.Barrier(size, timeout=120), threading.Lock()
    return [LockstepComm(r, size, slots, barrier, lock) for r in range(size)]


class Ranks:
    """The layers of one batch: one layer (``bounds`` = [(0, N)], no comm), or
    one per ThreadComm rank, rank r taking samples ``bounds[r]`` of the batch."""

    def __init__(self, make, bounds, synced, lockstep=False):
        self.bounds = bounds
        self.comms = None
        if synced:
            self.comms = (lockstep_comms if lockstep else thread_comms)(len(bounds))
        else:
            assert len(bounds) == 1
        self.layers = [make(comm) for comm in self.comms or [None]]

    def run(self, fn):
        """``[fn(layer, lo, hi) for each rank]``, the ranks in threads (a collective step)."""
        if self.comms is None:
            return [fn(self.layers[0], *self.bounds[0])]

        def rank(comm):
            with getattr(comm, "lock", contextlib.nullcontext()):
                return fn(self.layers[comm.rank], *self.bounds[comm.rank])

        return on_ranks(self.comms, rank)

    def step(self, x, dy):
        """Forward and backward of every rank on its slice: the batch's ``(y, dx)``
        (NumPy), in the batch's order."""
        def one(layer, lo, hi):
            y = host(layer(x[lo:hi]))
            return y, host(layer.backward(dy[lo:hi]))

        ys, dxs = zip(*self.run(one))
        return np.concatenate(ys), np.concatenate(dxs)

    def collectives(self):
        return [0] if self.comms is None else [c.collectives for c in self.comms]

    def grads(self, name):
        return [host(getattr(layer, name)) for layer in self.layers]


def groups_of(bounds, k):
    """Rows of the batch (rank slices ``bounds`` concatenated) in each ghost
    group: the g-th group of k samples of every rank, in rank order; one group of
    everything without ghost batches."""
    n = bounds[-1][1]
    if k is None:
        return [np.arange(n)]
    count = max(-(-max(hi - lo, 1) // k) for lo, hi in bounds)
    return [np.concatenate([np.arange(lo, hi)[g * k:(g + 1) * k] for lo, hi in bounds])
            for g in range(count)]


def make_layer(kind, c, comm, *, device="cpu", gamma=None, beta=None, **options):
    """A layer of the table's ``kind`` with ``options`` and the given parameters."""
    if kind.startswith("BatchRenorm"):
        options = {"rmax": RMAX, "dmax": DMAX, **options}
    layer = {"BatchNorm": nbbn.BatchNorm, "SyncBatchNorm": nbbn.SyncBatchNorm,
             "BatchRenorm": nbbn.BatchRenorm, "BatchRenorm-comm": nbbn.BatchRenorm}[kind](
        c, momentum=MOMENTUM, device=device, comm=comm, **options)
    if gamma is not None:
        layer.gamma, layer.beta = gamma, beta
    return layer


def skewed_input(rng, shape, axis, dtype, step=0):
    """Channels of different scales and offsets that drift with ``step``, so that
    Batch Renormalization's r and d are clipped."""
    c = shape[axis]
    scale = per_channel(np.geomspace(0.3, 4.0, c) * (1 + step), len(shape), axis)
    loc = per_channel(np.linspace(-2.0, 2.0, c) + step, len(shape), axis)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def close(actual, desired, dtype, scale=1.0):
    np.testing.assert_allclose(host(actual), desired, rtol=RTOL[dtype], atol=ATOL[dtype] * scale)


# --- the float64 model --------------------------------------------------------------

class Model:
    """A float64 NumPy model of a layer (BatchNorm or BatchRenorm, with any
    activation) on a whole batch, from tests/naive.py, group by group; its
    running statistics carry from group to group."""

    def __init__(self, layer):
        c = layer.num_features
        self.renorm = isinstance(layer, nbbn.BatchRenorm)
        self.relu = layer.activation == "relu"
        self.gamma = host(layer.gamma).astype(np.float64)
        self.beta = host(layer.beta).astype(np.float64)
        self.eps, self.axis = layer.eps, layer.axis
        self.mean, self.var, self.tracked = np.zeros(c), np.ones(c), 0
        self.saved = None

    @property
    def sigma(self):
        return np.sqrt(self.var + self.eps)

    def train(self, x, groups):
        """Training forward of batch ``x`` whose ghost groups are the rows ``groups``."""
        x = x.astype(np.float64)
        y, self.saved = np.empty_like(x), []
        for rows in groups:
            xg = x[rows]
            if self.renorm:
                yg, self.mean, sigma, mean, std, r, d = batch_renorm(
                    xg, self.mean, self.sigma, self.gamma, self.beta, RMAX, DMAX, MOMENTUM,
                    self.eps, self.axis)
                self.var = sigma ** 2 - self.eps  # BatchRenorm's running_var
                self.saved.append((rows, mean, std, r, d))
            else:
                yg, self.mean, self.var, mean, invstd = batch_norm(
                    xg, self.mean, self.var, self.gamma, self.beta, True, MOMENTUM, self.eps,
                    self.axis)
                self.saved.append((rows, mean, 1 / invstd, np.ones_like(mean),
                                   np.zeros_like(mean)))
            y[rows] = np.maximum(yg, 0) if self.relu else yg
            self.tracked += 1
        self.x = x
        return y

    def backward(self, dy, y):
        """Gradients of the last :meth:`train`: ``(dx, dgamma, dbeta, g, x_hat)``,
        ``g`` being ``dy`` through the ReLU (masked where the layer's output ``y``
        is not positive) and ``x_hat`` the normalized input before gamma and beta
        (``x_hat * r + d`` for Batch Renormalization)."""
        x, dy = self.x, np.asarray(dy, np.float64)
        g = np.where(y > 0, dy, 0.0) if self.relu else dy
        dx, x_hat = np.empty_like(x), np.empty_like(x)
        dgamma = dbeta = 0
        for rows, mean, std, r, d in self.saved:
            if self.renorm:
                dx[rows], dw, db = batch_renorm_backward(g[rows], x[rows], mean, std, r, d,
                                                         self.gamma, self.axis)
            else:
                dx[rows], dw, db = batch_norm_backward(g[rows], x[rows], mean, 1 / std,
                                                       self.gamma, True, self.axis)
            x_hat[rows] = ((x[rows] - per_channel(mean, x.ndim, self.axis))
                           / per_channel(std, x.ndim, self.axis)
                           * per_channel(r, x.ndim, self.axis) + per_channel(d, x.ndim, self.axis))
            dgamma, dbeta = dgamma + dw, dbeta + db
        return dx, dgamma, dbeta, g, x_hat

    def evaluate(self, x, dy, y_layer):
        """Evaluation forward and backward: ``(y, dx)`` with the running statistics."""
        y, _, _, mean, invstd = batch_norm(x, self.mean, self.var, self.gamma, self.beta,
                                           False, eps=self.eps, axis=self.axis)
        g = np.where(y_layer > 0, dy, 0.0) if self.relu else dy
        dx = batch_norm_backward(g, x, mean, invstd, self.gamma, False, self.axis)[0]
        return (np.maximum(y, 0) if self.relu else y), dx


def channel_sums(a, rows, axis):
    """Per-channel sums of ``a[rows]`` (rows along axis 0)."""
    return a[rows].sum(axis=reduce_axes(a.ndim, axis))


# --- 1. the table ------------------------------------------------------------------

KINDS = ["BatchNorm", "BatchRenorm", "SyncBatchNorm", "BatchRenorm-comm"]
SYNCED = {"SyncBatchNorm", "BatchRenorm-comm"}
PARTS = ("relu", "ghost", "cuda")
#: Every subset of the parts: (), ('relu',), ..., ('relu', 'ghost', 'cuda').
COMBINATIONS = [c for n in range(len(PARTS) + 1) for c in itertools.combinations(PARTS, n)]
#: (shape, axis, dtype) of the CPU cases: channels first and last, both dtypes. The
#: batch of 11 splits over two ranks as 5 + 6 samples, in ghost groups of 2: the
#: ranks' last groups are uneven (1 and 2 samples), the single layers' last group
#: has one sample (fine with the spatial axis).
CPU_SETTINGS = [((11, 3, 4), 1, np.float32), ((11, 3, 4), 1, np.float64),
                ((11, 2, 3), -1, np.float32), ((11, 2, 3), -1, np.float64)]
#: The simulator is slow: a batch of 7 (3 + 4 over two ranks), in ghost groups of 2.
GPU_SETTINGS = [((7, 2, 3), 1, np.float32), ((7, 3, 2), -1, np.float64)]
K = 2
STEPS = 3


def table():
    for kind, parts in itertools.product(KINDS, COMBINATIONS):
        name = f"{kind}-{'+'.join(parts) or 'alone'}"
        gpu = "cuda" in parts
        for shape, axis, dtype in GPU_SETTINGS if gpu else CPU_SETTINGS:
            yield pytest.param(kind, parts, shape, axis, dtype, marks=here if gpu else cpu,
                               id=f"{name}-{np.dtype(dtype).name}-axis{axis}")


def table_layers(kind, parts, c, bounds, rng, dtype, axis, lockstep=False):
    """The layers of a table case and, on the GPU, their CPU twins (same parameters);
    ``lockstep``: ranks that take turns (for a move to the GPU later)."""
    options = dict(axis=axis, dtype=dtype, activation="relu" if "relu" in parts else None,
                   virtual_batch_size=K if "ghost" in parts else None,
                   gamma=rng.uniform(0.5, 2.0, c).astype(dtype),
                   beta=rng.standard_normal(c).astype(dtype))
    synced = kind in SYNCED
    gpu = "cuda" in parts

    def ranks(device):
        return Ranks(lambda comm: make_layer(kind, c, comm, device=device, **options), bounds,
                     synced, lockstep=lockstep or device == "cuda")

    return ranks("cuda" if gpu else "cpu"), ranks("cpu") if gpu else None


def assert_state(ranks, model, dtype):
    """Running statistics and num_batches_tracked of every rank: the model's, and
    bitwise the same on every rank."""
    first = ranks.layers[0].state_dict()
    for layer in ranks.layers:
        state = layer.state_dict()
        assert type(state["running_mean"]) is np.ndarray
        close(state["running_mean"], model.mean, dtype)
        if model.renorm:  # the moving sigma; running_var is sigma**2 - eps
            close(layer.running_std, model.sigma, dtype)
        else:
            close(state["running_var"], model.var, dtype)
        assert layer.num_batches_tracked == model.tracked
        for k, v in state.items():
            np.testing.assert_array_equal(v, first[k])


def train_and_check(ranks, model, groups, shape, axis, dtype, rng, steps, twins=None):
    """``steps`` training steps of ``ranks`` against ``model`` (and ``twins``): outputs,
    input gradients, per-rank and total grad_gamma/grad_beta, state, collectives."""
    bounds, c = ranks.bounds, shape[axis]
    values = np.prod(shape) // c  # per channel: the atol scale of sums over the batch
    corrections = []
    for _ in range(steps):
        step = model.tracked // len(groups)
        x = skewed_input(rng, shape, axis, dtype, step)
        dy = random_input(rng, shape, dtype)
        y, dx = ranks.step(x, dy)
        assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == shape
        y_ref = model.train(x, groups)
        dx_ref, dgamma, dbeta, g, x_hat = model.backward(dy, y)
        close(y, y_ref, dtype, 10)
        close(dx, dx_ref, dtype, 10)
        if model.relu:
            assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
        # per rank: the sums over its own slice; over the ranks: the batch's
        for (lo, hi), grad_gamma, grad_beta in zip(bounds, ranks.grads("grad_gamma"),
                                                   ranks.grads("grad_beta")):
            assert grad_gamma.dtype == grad_beta.dtype == dtype
            close(grad_gamma, channel_sums(g * x_hat, slice(lo, hi), axis), dtype, values)
            close(grad_beta, channel_sums(g, slice(lo, hi), axis), dtype, values)
        close(sum(v.astype(np.float64) for v in ranks.grads("grad_gamma")), dgamma, dtype, values)
        close(sum(v.astype(np.float64) for v in ranks.grads("grad_beta")), dbeta, dtype, values)
        assert_state(ranks, model, dtype)
        # one collective per ghost group in the forward, one in the backward
        assert ranks.collectives() == [2 * model.tracked if ranks.comms else 0] * len(bounds)
        if twins is not None:
            assert_twins(ranks, twins, x, dy, y, dx, dtype)
        if model.renorm:
            corrections += [(host(g.correction[0]), host(g.correction[1]))
                            for g in ranks.layers[0]._saved.groups]
    if model.renorm:  # the corrections were clipped, somewhere
        r, d = (np.concatenate(v) for v in zip(*corrections))
        assert np.any(np.isclose(r, RMAX) | np.isclose(r, 1 / RMAX))
        assert np.any(np.isclose(np.abs(d), DMAX))


def evaluate_and_check(ranks, model, shape, axis, dtype, rng, twins=None):
    """An evaluation forward and backward of every rank alone (no collective)."""
    collectives = ranks.collectives()
    for layer in ranks.layers + (twins.layers if twins else []):
        layer.eval()
    x = skewed_input(rng, shape, axis, dtype, 1)
    dy = random_input(rng, shape, dtype)
    y, dx = ranks.step(x, dy)
    y_ref, dx_ref = model.evaluate(x, dy, y)
    close(y, y_ref, dtype, 10)
    close(dx, dx_ref, dtype, 10)
    assert_state(ranks, model, dtype)
    assert ranks.collectives() == collectives
    if twins is not None:
        assert_twins(ranks, twins, x, dy, y, dx, dtype)
    for layer in ranks.layers + (twins.layers if twins else []):
        layer.train()


@pytest.mark.parametrize("kind,parts,shape,axis,dtype", list(table()))
def test_every_combination_matches_the_float64_model(rng, kind, parts, shape, axis, dtype):
    c, n = shape[axis], shape[0]
    bounds = [(0, n // 2), (n // 2, n)] if kind in SYNCED else [(0, n)]
    ranks, twins = table_layers(kind, parts, c, bounds, rng, dtype, axis)
    layer = ranks.layers[0]
    assert layer.device == ("cuda" if "cuda" in parts else "cpu")
    assert (layer.activation == "relu") == ("relu" in parts)
    assert (layer.virtual_batch_size == K) == ("ghost" in parts)
    assert (layer.comm is not None) == (kind in SYNCED)
    model = Model(layer)
    groups = groups_of(bounds, layer.virtual_batch_size)
    assert len(groups) == (-(-max(hi - lo for lo, hi in bounds) // K) if "ghost" in parts else 1)
    train_and_check(ranks, model, groups, shape, axis, dtype, rng, STEPS, twins)
    evaluate_and_check(ranks, model, shape, axis, dtype, rng, twins)


@here
@pytest.mark.parametrize("kind", KINDS)
def test_every_combination_moves_between_devices_mid_training(rng, kind):
    """relu + ghost layers trained on the CPU, moved by ``.to('cuda')``, trained and
    evaluated there, moved back: the float64 model's steps throughout."""
    # channels first, float32 for the BatchNorms; channels last, float64 for the renorms
    shape, axis, dtype = GPU_SETTINGS[kind.startswith("BatchRenorm")]
    c, n = shape[axis], shape[0]
    bounds = [(0, n // 2), (n // 2, n)] if kind in SYNCED else [(0, n)]
    ranks, _ = table_layers(kind, ("relu", "ghost"), c, bounds, rng, dtype, axis,
                            lockstep=True)
    model = Model(ranks.layers[0])
    groups = groups_of(bounds, K)
    for device in ("cpu", "cuda", "cpu"):
        for layer in ranks.layers:
            assert layer.to(device) is layer and layer.device == device
        train_and_check(ranks, model, groups, shape, axis, dtype, rng, 2)
        if device == "cuda":
            evaluate_and_check(ranks, model, shape, axis, dtype, rng)


def assert_twins(ranks, twins, x, dy, y, dx, dtype):
    """The GPU layers' step equals their CPU twins' (conftest's tolerances)."""
    y_cpu, dx_cpu = twins.step(x, dy)
    close(y, y_cpu, dtype)
    close(dx, dx_cpu, dtype)
    for gpu, cpu_layer in zip(ranks.layers, twins.layers):
        for name in ("grad_gamma", "grad_beta"):
            close(getattr(gpu, name), getattr(cpu_layer, name), dtype)
        state, state_cpu = gpu.state_dict(), cpu_layer.state_dict()
        assert state.keys() == state_cpu.keys()
        for k, v in state.items():
            close(v, state_cpu[k], dtype)
        assert gpu.num_batches_tracked == cpu_layer.num_batches_tracked


# --- 2. BatchRenorm(rmax=1, dmax=0) is BatchNorm, bit for bit ------------------------------

def bitwise_case(ranks, k, activation, dtype, axis, rng, device="cpu", steps=3):
    """BatchNorm and BatchRenorm(rmax=1, dmax=0) with the same options, over
    ``ranks`` ThreadComm ranks (0: no comm): outputs, input gradients,
    grad_gamma and grad_beta of every training step are bitwise equal."""
    shape = (10, 3, 4) if axis == 1 else (10, 4, 3)
    c = shape[axis]
    bounds = [(10 * r // ranks, 10 * (r + 1) // ranks) for r in range(ranks)] or [(0, 10)]
    options = dict(axis=axis, dtype=dtype, activation=activation, virtual_batch_size=k,
                   device=device, gamma=rng.uniform(0.5, 2.0, c).astype(dtype),
                   beta=rng.standard_normal(c).astype(dtype))
    kinds = {"BatchNorm": ("SyncBatchNorm" if ranks else "BatchNorm", {}),
             "BatchRenorm": ("BatchRenorm-comm" if ranks else "BatchRenorm",
                             dict(rmax=1.0, dmax=0.0))}
    layers = {name: Ranks(lambda comm, kind=kind, extra=extra: make_layer(
        kind, c, comm, **options, **extra), bounds, bool(ranks), lockstep=device == "cuda")
        for name, (kind, extra) in kinds.items()}
    assert [(layer.rmax, layer.dmax) for layer in layers["BatchRenorm"].layers] == \
        [(1.0, 0.0)] * len(bounds)
    for step in range(steps):
        x = skewed_input(rng, shape, axis, dtype, step)
        dy = random_input(rng, shape, dtype)
        y, dx = layers["BatchNorm"].step(x, dy)
        y_rn, dx_rn = layers["BatchRenorm"].step(x, dy)
        np.testing.assert_array_equal(y_rn, y)
        np.testing.assert_array_equal(dx_rn, dx)
        for name in ("grad_gamma", "grad_beta"):
            for a, b in zip(layers["BatchRenorm"].grads(name), layers["BatchNorm"].grads(name)):
                np.testing.assert_array_equal(a, b)


@cpu
@pytest.mark.parametrize("ranks", [0, 2], ids=["single", "2ranks"])
@pytest.mark.parametrize("k", [None, 3], ids=["batch", "ghost"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_renorm_rmax_1_dmax_0_is_bitwise_batchnorm(rng, ranks, k, activation, dtype, axis):
    bitwise_case(ranks, k, activation, dtype, axis, rng)


@here
@pytest.mark.parametrize("ranks", [0, 2], ids=["single", "2ranks"])
@pytest.mark.parametrize("axis,dtype", [(1, np.float32), (-1, np.float64)])
def test_renorm_rmax_1_dmax_0_is_bitwise_batchnorm_on_the_gpu(rng, ranks, axis, dtype):
    bitwise_case(ranks, 3, "relu", dtype, axis, rng, device="cuda")


# --- 3. synchronized layers equal the single-process layer on the whole batch --------------

def bounds_of(sizes):
    ends = np.cumsum([0] + list(sizes)).tolist()
    return list(zip(ends[:-1], ends[1:]))


#: name: (samples per rank, virtual_batch_size). With ghost batches every rank has as
#: many groups (ceil(n / k), one for an empty slice); only the last ones may differ in size.
SLICES = {
    "2even": ((4, 4), None),
    "2uneven": ((3, 6), None),
    "3uneven-empty": ((3, 0, 5), None),
    "3uneven": ((2, 3, 4), None),
    "2even-ghost2": ((5, 5), 2),  # groups of 2, 2, 1 on each rank
    "3even-ghost3": ((4, 4, 4), 3),  # groups of 3, 1
    "2uneven-ghost2": ((5, 6), 2),  # last groups of 1 and 2 samples
    "3uneven-empty-ghost4": ((3, 0, 2), 4),  # one group on every rank
}
#: The single-process layer of each synchronized one.
SINGLE = {"SyncBatchNorm": "BatchNorm", "BatchRenorm-comm": "BatchRenorm"}
#: name: (shape of a sample, axis, dtype): (N, C) and channels-last (N, L, C).
SAMPLES = {"NC-float64": ((3,), 1, np.float64), "NLC-float32": ((2, 3), -1, np.float32)}
#: On the GPU (the simulator): uneven slices, an empty one, ghost batches, with ReLU.
GPU_SLICES = {"3uneven-empty": "NLC-float32", "2uneven-ghost2": "NC-float64",
              "3uneven-empty-ghost4": "NLC-float32"}


def sync_cases():
    for kind, (slices, (sizes, k)), activation, (sample, setting), device in itertools.product(
            SINGLE, SLICES.items(), [None, "relu"], SAMPLES.items(), ["cpu", "cuda"]):
        if device == "cuda" and (GPU_SLICES.get(slices) != sample or activation is None):
            continue
        yield pytest.param(kind, sizes, k, activation, *setting, device,
                           marks=here if device == "cuda" else cpu,
                           id=f"{kind}-{slices}-{activation or 'linear'}-{sample}-{device}")


@pytest.mark.parametrize("kind,sizes,k,activation,sample,axis,dtype,device", list(sync_cases()))
def test_synchronized_equals_single_process(rng, kind, sizes, k, activation, sample, axis,
                                            dtype, device):
    """R ranks with ``virtual_batch_size=k`` equal one process with ``k * R`` on the
    batch laid out group by group (the concatenation without ghost batches); the
    single process runs on the CPU."""
    bounds, n = bounds_of(sizes), sum(sizes)
    shape = (n,) + sample
    c = shape[axis]
    groups = groups_of(bounds, k)
    order = np.concatenate(groups)  # the single process's layout of the batch
    options = dict(axis=axis, dtype=dtype, activation=activation,
                   gamma=rng.uniform(0.5, 2.0, c).astype(dtype),
                   beta=rng.standard_normal(c).astype(dtype))
    sync = Ranks(lambda comm: make_layer(kind, c, comm, virtual_batch_size=k, device=device,
                                         **options), bounds, True, lockstep=device == "cuda")
    single = Ranks(lambda comm: make_layer(SINGLE[kind], c, None,
                                           virtual_batch_size=k and k * len(sizes), **options),
                   [(0, n)], False)
    for step in range(3):
        x = skewed_input(rng, shape, axis, dtype, step)
        dy = random_input(rng, shape, dtype)

        def one(layer, lo, hi):
            y = host(layer(x[lo:hi]))
            after_forward = layer.comm.collectives
            return y, host(layer.backward(dy[lo:hi])), after_forward

        ys, dxs, forwards = zip(*sync.run(one))
        y1, dx1 = single.step(x[order], dy[order])
        close(np.concatenate(ys)[order], y1, dtype)
        close(np.concatenate(dxs)[order], dx1, dtype)
        for name in ("grad_gamma", "grad_beta"):
            grads = sync.grads(name)
            close(sum(g.astype(np.float64) for g in grads), single.grads(name)[0], dtype)
            for (lo, hi), g in zip(bounds, grads):
                assert g.dtype == dtype and (lo < hi or not g.any())  # an empty slice: 0
        reference = single.layers[0]
        for layer in sync.layers:
            for key, value in layer.state_dict().items():
                close(value, reference.state_dict()[key], dtype)
                np.testing.assert_array_equal(value, sync.layers[0].state_dict()[key])
            assert layer.num_batches_tracked == reference.num_batches_tracked
        # one collective per ghost group in the forward, and one in the backward
        assert list(forwards) == [(2 * step + 1) * len(groups)] * len(sizes)
        assert sync.collectives() == [2 * (step + 1) * len(groups)] * len(sizes)
    for layer in sync.layers + single.layers:
        layer.eval()
    y, dx = sync.step(x, dy)
    y1, dx1 = single.step(x, dy)
    close(y, y1, dtype)
    close(dx, dx1, dtype)
    assert sync.collectives() == [6 * len(groups)] * len(sizes)  # none in evaluation


# --- 4. bad input to a composed layer changes nothing ------------------------------------

def composed(kind, comm=None, device="cpu"):
    """A layer of ``kind`` with ghost batches of 2 and the fused ReLU, float32, 3 channels."""
    return make_layer(kind, 3, comm, virtual_batch_size=2, activation="relu", device=device)


#: (input, out, error, match) of a forward that must be refused.
BAD_FORWARD = [
    pytest.param(np.ones((4, 5), np.float32), None, ValueError, "expected 3 channels.*got 5",
                 id="channels"),
    pytest.param(np.arange(15, dtype=np.float32).reshape(5, 3), None, ValueError,
                 r"more than 1 value per channel.*samples 4:5.*virtual_batch_size=2",
                 id="group-of-one-value"),
    pytest.param(np.ones((4, 3), np.int32), None, TypeError, "float32 or float64", id="dtype"),
    pytest.param(np.ones(3, np.float32), None, ValueError, "2-D to 5-D", id="1-D"),
    pytest.param(np.ones((4, 3), np.float32), np.empty((2, 3), np.float32), ValueError,
                 "out must have shape", id="out"),
]
#: (dy, out, error, match) of a backward that must be refused.
BAD_BACKWARD = [
    (np.ones((4, 2), np.float32), None, ValueError, "dy must have shape"),
    (np.ones((4, 3), np.float64), None, TypeError, "dy must have dtype"),
    (np.ones((4, 3), np.float32), np.empty((4, 3), np.float64), TypeError, "out must have dtype"),
]


def trained_step(layer, rng):
    """One good training step; returns ``(dy, dx)`` of it."""
    x = skewed_input(rng, (4, 3), 1, np.float32)
    dy = random_input(rng, (4, 3), np.float32)
    layer(x)
    return dy, host(layer.backward(dy))


@cpu
@pytest.mark.parametrize("kind", ["BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("x,out,error,match", BAD_FORWARD)
def test_bad_input_to_a_composed_layer_changes_nothing(rng, kind, x, out, error, match):
    layer = composed(kind)
    dy, dx = trained_step(layer, rng)
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer(x, out=out)
    assert_unchanged(layer, before)
    for bad_dy, bad_out, error, match in BAD_BACKWARD:
        with pytest.raises(error, match=match):
            layer.backward(bad_dy, out=bad_out)
        assert_unchanged(layer, before)
    np.testing.assert_array_equal(layer.backward(dy), dx)  # the last forward is still there


def ones(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


#: (rank 0's input, rank 1's input, the errors on ranks 0 and 1, their messages).
BAD_SYNCHRONIZED = [
    pytest.param(ones(4, 3), ones(4, 5), (RuntimeError, ValueError),
                 (r"forward failed on rank\(s\) \[1\]", "expected 3 channels"),
                 id="channels-on-rank1"),
    pytest.param(ones(4, 3), ones(4, 3, dtype=np.int32), (RuntimeError, TypeError),
                 (r"rank\(s\) \[1\]", "float32 or float64"), id="dtype-on-rank1"),
    pytest.param(ones(5, 3), ones(0, 3), (ValueError, ValueError),
                 (r"every rank must have as many ghost groups; got \[3, 1\]",) * 2,
                 id="ghost-groups-differ"),
    pytest.param(ones(1, 3), ones(0, 3), (ValueError, ValueError),
                 ("Expected more than 1 value per channel when training, got 1 over 2 rank",) * 2,
                 id="one-value-per-channel"),
]


@cpu
@pytest.mark.parametrize("kind", ["SyncBatchNorm", "BatchRenorm-comm"])
@pytest.mark.parametrize("x0,x1,errors,matches", BAD_SYNCHRONIZED)
def test_bad_input_to_a_synchronized_composed_layer_changes_nothing_on_any_rank(
        rng, kind, x0, x1, errors, matches):
    ranks = Ranks(lambda comm: composed(kind, comm), [(0, 4), (4, 8)], True)
    good = [skewed_input(rng, (8, 3), 1, np.float32, step) for step in range(2)]
    ranks.step(good[0], ones(8, 3))
    inputs = [x0, x1]

    def rank(layer, lo, hi):
        r, collectives = layer.comm.Get_rank(), layer.comm.collectives
        before = snapshot(layer)
        with pytest.raises(errors[r], match=matches[r]):
            layer(inputs[r])
        assert_unchanged(layer, before)
        return layer.comm.collectives - collectives

    assert ranks.run(rank) == [1, 1]  # the failed forward joined one collective, no more
    ranks.step(good[1], ones(8, 3))  # the layers are still usable
    assert [layer.num_batches_tracked for layer in ranks.layers] == [4, 4]  # 2 groups a step


@here
@pytest.mark.parametrize("x,out,error,match", [
    BAD_FORWARD[0], BAD_FORWARD[1],
    pytest.param(np.ones((4, 3), np.float32), np.empty((4, 3), np.float32), TypeError,
                 "out must be a device array", id="host-out")])
def test_bad_input_to_a_composed_gpu_layer_changes_nothing(rng, x, out, error, match):
    layer = composed("BatchRenorm", device="cuda")
    dy, dx = trained_step(layer, rng)

    def state():
        return dict(layer.state_dict(), tracked=layer.num_batches_tracked,
                    grad_gamma=host(layer.grad_gamma), grad_beta=host(layer.grad_beta))

    before = state()
    with pytest.raises(error, match=match):
        layer(x, out=out)
    with pytest.raises(ValueError, match="dy must have shape"):
        layer.backward(np.ones((4, 2), np.float32))
    after = state()
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    np.testing.assert_array_equal(host(layer.backward(dy)), dx)
