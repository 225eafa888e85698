"""Data-parallel training of a small NumPy MLP with SyncBatchNorm, over MPI.

Run over two processes with::

    mpiexec -n 2 python -m nbbn.programs.mpi_mlp

(``pip install 'nbbn[mpi]'`` installs mpi4py and MPICH, whose ``mpiexec``
lands beside ``python``). The model is the NumPy MLP of :mod:`nbbn.programs.mlp`,
Linear -> SyncBatchNorm -> ReLU -> Linear, with softmax cross-entropy,
trained in float64 with plain SGD on the digits data
set of scikit-learn when it is installed, else on synthetic clusters. Every
step draws one global batch (the same on every rank); each rank takes its
slice, runs forward and backward, and the ranks average their gradients
with one ``Allreduce``. Every rank also trains the same model with plain
``BatchNorm`` on the whole batch, in one process, and checks that the two
runs agree step for step; the script prints the comparison and exits with
status 1 if they differ.
"""
import argparse
import sys

import numpy as np

import nbbn
from nbbn.programs.mlp import MLP, accuracy, cross_entropy

#: Largest parameter difference (relative to the parameter's scale) that still
#: counts as the same run: the two runs differ only in rounding.
TOLERANCE = 1e-9


def load_data(rng):
    """(x, labels, n_classes), features standardized, float64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        centers = rng.standard_normal((10, 64)) * 1.5
        labels = rng.integers(0, 10, 2000)
        x = centers[labels] + rng.standard_normal((labels.size, 64))
    else:
        x, labels = load_digits(return_X_y=True)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return x, labels, int(labels.max()) + 1


def state(net):
    """Parameters and running statistics of ``net``, in a fixed order."""
    return net.parameters() + [a for bn in net.norms for a in (bn.running_mean, bn.running_var)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)

    try:
        from mpi4py import MPI
    except ImportError:
        parser.exit(2, "this example needs mpi4py and an MPI library: pip install 'nbbn[mpi]'\n")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.batch < size:
        parser.error(f"--batch {args.batch} gives some of the {size} ranks no samples")
    say = print if rank == 0 else (lambda *a, **k: None)

    rng = np.random.default_rng(0)  # the same stream on every rank
    x_all, y_all, n_classes = load_data(rng)
    order = rng.permutation(len(x_all))
    test, train = order[:300], order[300:]
    sizes = [x_all.shape[1], args.hidden, n_classes]
    net = MLP(sizes, seed=1, make_norm=lambda c: nbbn.SyncBatchNorm(c, dtype=np.float64, comm=comm))
    single = MLP(sizes, seed=1)  # the same initial weights, plain BatchNorm
    lo, hi = np.cumsum([0] + [len(s) for s in np.array_split(np.arange(args.batch), size)])[
        rank:rank + 2]
    say(f"{size} process(es), global batch {args.batch} (rank 0: samples {lo}:{hi}), "
        f"{len(train)} training samples, {sizes[0]} features, {n_classes} classes")

    worst = 0.0
    for step in range(1, args.steps + 1):
        batch = rng.choice(train, args.batch, replace=False)
        xb, yb = x_all[batch], y_all[batch]

        # Data-parallel: this rank's slice. cross_entropy gives the gradient of
        # the slice's mean loss; weighted by the slice's share of the batch
        # times the number of ranks, the average of the ranks' gradients is
        # the gradient of the global mean loss (for equal slices the weight is 1).
        loss, dlogits = cross_entropy(net.forward(xb[lo:hi]), yb[lo:hi])
        net.backward(dlogits * ((hi - lo) * size / args.batch))
        grads = net.gradients()
        flat = np.concatenate([g.ravel() for g in grads])
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)  # one collective for all gradients
        flat /= size
        for g, avg in zip(grads, np.split(flat, np.cumsum([g.size for g in grads])[:-1])):
            g[...] = avg.reshape(g.shape)
        net.sgd_step(args.lr)
        loss = comm.allreduce(loss * (hi - lo)) / args.batch

        # The same step in one process, on the whole batch.
        ref_loss, ref_dlogits = cross_entropy(single.forward(xb), yb)
        single.backward(ref_dlogits)
        single.sgd_step(args.lr)

        diff = max(np.abs(a - b).max() / max(np.abs(b).max(), 1.0)
                   for a, b in zip(state(net), state(single)))
        worst = max(worst, comm.allreduce(diff, op=MPI.MAX))
        if step == 1 or step % 10 == 0 or step == args.steps:
            say(f"step {step:3d}  loss {loss:.6f}  single-process loss {ref_loss:.6f}  "
                f"largest parameter difference so far {worst:.1e}")

    net.eval()  # running statistics: no communication
    say(f"held-out accuracy {accuracy(net.forward(x_all[test]), y_all[test]):.3f}")
    same = worst <= TOLERANCE
    say(f"{'MATCH' if same else 'MISMATCH'}: data-parallel training over {size} process(es) "
        f"{'matches' if same else 'does not match'} the single-process run step for step "
        f"(largest relative parameter difference {worst:.1e}, tolerance {TOLERANCE:.0e})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
