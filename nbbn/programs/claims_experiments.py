"""The experiments behind ``python -m nbbn demo --claims``, one function per claim, each
returning a :class:`nbbn.programs.claims.ClaimResult`. :data:`CLAIMS` lists them in table
order. Every network is trained by :func:`nbbn.programs.mlp.fit` on scikit-learn's digits
(split, initial weights and batch order from the seed), with and without batch norm from
the same initial weights; :class:`Runner` trains each configuration once and shares it
between claims, and :func:`run_claims` runs the claims asked for.
"""
import time

import numpy as np

import nbbn

from .claims import FULL, ClaimResult, Comparison
from .cnn import CNN
from .digits import load_digits_split
from .mlp import MLP, accuracy, fit

__all__ = ["CLAIMS", "Runner", "batch_stats_accuracy", "run_claims"]

PLAIN, BN = "plain", "BatchNorm"


def _state(net):
    return [(n.running_mean.copy(), n.running_var.copy(), n.num_batches_tracked)
            for n in net.norms]


def _restore(net, state):
    for n, (mean, var, tracked) in zip(net.norms, state):
        n.running_mean[...], n.running_var[...], n.num_batches_tracked = mean, var, tracked


def _batches(x, size):
    """Consecutive batches of exactly ``size`` rows (a partial last batch is left out)."""
    return [x[i:i + size] for i in range(0, len(x) - size + 1, size)]


def batch_stats_accuracy(net, x, y, batch_size):
    """Accuracy of ``net`` in training mode (batch statistics) on consecutive batches of
    ``batch_size`` (a partial last batch is left out), leaving the running statistics and
    the mode (evaluation) as they were."""
    state = _state(net)
    net.train()
    with np.errstate(all="ignore"):
        pred = np.concatenate([np.argmax(net.forward(xb), axis=1)
                               for xb in _batches(x, batch_size)])
    _restore(net, state)
    net.eval()
    return float((pred == y[:len(pred)]).mean())


def precise_accuracy(net, x_train, x_test, y_test, batch_size):
    """Test accuracy in evaluation mode after ``nbbn.precise_statistics`` recomputed the
    running statistics over ``x_train`` (batches of ``batch_size``); the running
    statistics are put back afterwards."""
    state = _state(net)
    with np.errstate(all="ignore"):
        with nbbn.precise_statistics(net.norms):
            for xb in _batches(x_train, batch_size):
                net.forward(xb)
        acc = accuracy(net.eval().forward(x_test), y_test)
    _restore(net, state)
    return acc


def _make_norm(norm, dtype):
    """``make_norm`` for 'bn', 'renorm' or ('ghost', k); None for 'none'."""
    if norm == "none":
        return None
    if norm == "bn":
        return lambda c: nbbn.BatchNorm(c, dtype=dtype)
    if norm == "renorm":
        return lambda c: nbbn.BatchRenorm(c, dtype=dtype)
    return lambda c: nbbn.BatchNorm(c, dtype=dtype, virtual_batch_size=norm[1])


class Runner:
    """Trains and measures networks for the claims, once per configuration.

    Parameters
    ----------
    config : nbbn.programs.claims.Config
        The sizes.
    """

    def __init__(self, config):
        self.config = config
        self._data, self._runs = {}, {}

    def data(self, seed, *, images=False, subset=None):
        """The digits split of ``seed``: flat (N, 64) or images (N, 1, 8, 8), float32,
        optionally the first ``subset`` training samples only."""
        if seed not in self._data:
            self._data[seed] = load_digits_split(seed)
        x_tr, y_tr, x_te, y_te = self._data[seed]
        if subset is not None:
            x_tr, y_tr = x_tr[:subset], y_tr[:subset]
        if images:
            x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
        return x_tr, y_tr, x_te, y_te

    def run(self, seed, lr, *, model="mlp", norm="bn", steps=None, batch_size=64,
            eval_every=None, subset=None, probe=None, **net_options):
        """Train one network (or return the result of an identical earlier call).

        Parameters
        ----------
        seed : int
            Seed of the split, the weights and the batches.
        lr : float
            SGD learning rate.
        model : {'mlp', 'cnn'}
            ``MLP([64, *hidden, 10])`` (hidden widths from ``net_options`` or the
            config) or ``CNN((1, 8, 8), 10)``.
        norm : {'none', 'bn', 'renorm'} or ('ghost', k)
            No normalization, ``nbbn.BatchNorm``, ``nbbn.BatchRenorm`` or
            ``nbbn.BatchNorm(virtual_batch_size=k)``.
        steps, batch_size, eval_every : int
            As :func:`nbbn.programs.mlp.fit` (defaults from the config).
        subset : int, optional
            Train on the first this many training samples only.
        probe : {None, 'train_acc', 'modes'}
            Also measure at each evaluation: the training accuracy in evaluation
            mode (``train_acc``); or the test accuracy with batch statistics
            (``batch_acc``) and with the statistics recomputed by
            ``nbbn.precise_statistics`` (``precise_acc``).
        **net_options
            Passed to the network (``activation``, ``dropout``, ``init_scale``,
            ``hidden``, ``channels``).

        Returns
        -------
        dict
            :func:`~nbbn.programs.mlp.fit`'s result, with ``end_acc`` (mean test
            accuracy over the last 10% of the evaluations; for a diverged run the
            accuracy of what it outputs) and, with a normalization,
            ``end_batch_acc`` (:func:`batch_stats_accuracy` on the test set after
            training); ``budget``, the number of steps.
        """
        c = self.config
        key = (model, seed, lr, norm, steps, batch_size, eval_every, subset, probe,
               tuple(sorted(net_options.items())))
        if key in self._runs:
            return self._runs[key]
        data = self.data(seed, images=model == "cnn", subset=subset)
        steps = steps or (c.cnn_steps if model == "cnn" else c.steps)
        eval_every = eval_every or (c.cnn_eval_every if model == "cnn" else c.eval_every)
        kw = dict(batch_norm=norm != "none", seed=seed, dtype=np.float32,
                  make_norm=_make_norm(norm, np.float32))
        if model == "cnn":
            net = CNN((1, 8, 8), 10, channels=net_options.pop("channels", c.cnn_channels),
                      **kw, **net_options)
        else:
            hidden = net_options.pop("hidden", c.hidden)
            net = MLP([64, *hidden, 10], **kw, **net_options)
        r = fit(net, data, lr=lr, steps=steps, batch_size=batch_size, seed=seed,
                eval_every=eval_every, target=c.target,
                on_eval=self._probe(probe, data, batch_size))
        x_te, y_te = data[2], data[3]
        if r["diverged_at"] is None:
            r["end_acc"] = _tail_mean(r["test_acc"])
        else:
            with np.errstate(all="ignore"):
                r["end_acc"] = accuracy(net.eval().forward(x_te), y_te)
        r["budget"] = steps
        if net.norms:
            r["end_batch_acc"] = batch_stats_accuracy(net, x_te, y_te, batch_size)
        self._runs[key] = r
        return r

    @staticmethod
    def _probe(kind, data, batch_size):
        x_tr, y_tr, x_te, y_te = data
        if kind is None:
            return None
        if kind == "train_acc":
            return lambda net, step: {"train_acc": accuracy(net.forward(x_tr), y_tr)}
        if kind != "modes":
            raise ValueError(f"unknown probe {kind!r}")

        def modes(net, step):
            return {"batch_acc": batch_stats_accuracy(net, x_te, y_te, batch_size),
                    "precise_acc": precise_accuracy(net, x_tr, x_te, y_te, batch_size)}
        return modes


def _result(name, comparisons, headline, data, arms=(BN, PLAIN), extra=()):
    """The :class:`ClaimResult` of claim ``name`` (its sentence from :data:`CLAIMS`)."""
    return ClaimResult(name, CLAIMS[name][0], arms, comparisons, headline, data, list(extra))


def _mean_over(comparisons, setting):
    """The per-seed mean over ``comparisons`` (same metric) as one Comparison."""
    first = comparisons[0]
    return Comparison(setting, first.metric, first.better,
                      np.mean([c.a for c in comparisons], axis=0),
                      np.mean([c.b for c in comparisons], axis=0), first.fmt)


def _steps_to_target(r):
    """Steps to the target accuracy; a run that never got there counts its whole budget."""
    return r["budget"] if r["steps_to_target"] is None else r["steps_to_target"]


def _settings(values):
    return ", ".join(f"{v:g}" for v in values)


def _tail_mean(values):
    """Mean over the last 10% of ``values`` (at least the last one)."""
    return float(np.mean(values[-max(1, len(values) // 10):]))


def _curves(runs):
    """What a figure needs from runs: steps, test accuracy and the probes' lists."""
    keys = ("eval_steps", "test_acc", "train_acc", "batch_acc", "precise_acc")
    return [{k: r[k] for k in keys if k in r} for r in runs]


def speed(runner, model="mlp"):
    """Claim 1 (and 8 with ``model='cnn'``): fewer steps to the target accuracy."""
    c = runner.config
    comparisons, data = [], {}
    for lr in c.speed_lrs:
        runs = {norm: [runner.run(s, lr, model=model, norm=norm) for s in c.seeds]
                for norm in ("bn", "none")}
        comparisons.append(Comparison(
            f"lr {lr:g}", f"steps to {c.target:.0%} test accuracy", "lower",
            [_steps_to_target(r) for r in runs["bn"]],
            [_steps_to_target(r) for r in runs["none"]], ".0f"))
        data[lr] = {arm: _curves(runs[norm]) for arm, norm in ((BN, "bn"), (PLAIN, "none"))}
    name = "speed" if model == "mlp" else "cnn-speed"
    return _result(name, comparisons,
                   _mean_over(comparisons, "mean over lr " + _settings(c.speed_lrs)),
                   {"curves": data, "target": c.target})


def learning_rates(runner, model="mlp"):
    """Claim 2 (and 8 with ``model='cnn'``): trains at higher learning rates."""
    c = runner.config
    end = {norm: np.array([[runner.run(s, lr, model=model, norm=norm)["end_acc"]
                            for lr in c.lr_grid] for s in c.seeds]) for norm in ("bn", "none")}
    lrs = np.array(c.lr_grid)

    def largest(acc):                  # per seed: the largest lr ending at the target
        return [lrs[ok].max() if ok.any() else 0.0 for ok in acc >= c.target]

    comparison = Comparison(f"lr {_settings(c.lr_grid)}",
                            f"largest lr ending at {c.target:.0%} test accuracy", "higher",
                            largest(end["bn"]), largest(end["none"]), ".3g")
    name = "lr" if model == "mlp" else "cnn-lr"
    return _result(name, [comparison], comparison,
                   {"lrs": lrs, BN: end["bn"], PLAIN: end["none"], "target": c.target})


def init_scale(runner):
    """Claim 3: less sensitive to the scale of the initial weights."""
    c = runner.config
    end = {norm: np.array([[runner.run(s, c.init_lr, norm=norm, init_scale=k)["end_acc"]
                            for k in c.init_scales] for s in c.seeds]) for norm in ("bn", "none")}
    comparisons = [Comparison(f"scale {k:g}", "end test accuracy", "higher",
                              end["bn"][:, i], end["none"][:, i])
                   for i, k in enumerate(c.init_scales) if k != 1]
    off = [k for k in c.init_scales if k != 1]
    return _result("init", comparisons, _mean_over(comparisons, "mean over scale "
                                                   + _settings(off)),
                   {"scales": np.array(c.init_scales), BN: end["bn"], PLAIN: end["none"]})


def saturating(runner):
    """Claim 4: trains deep networks with saturating nonlinearities."""
    c = runner.config
    comparisons, data = [], {}
    for act, depth in c.saturating:
        hidden = (c.saturating_width,) * depth
        runs = {norm: [runner.run(s, c.saturating_lr, norm=norm, activation=act, hidden=hidden,
                                  steps=c.saturating_steps, eval_every=c.eval_every * 2)
                       for s in c.seeds] for norm in ("bn", "none")}
        setting = f"{act}, {depth} hidden layers"
        comparisons.append(Comparison(setting, "end test accuracy", "higher",
                                      [r["end_acc"] for r in runs["bn"]],
                                      [r["end_acc"] for r in runs["none"]]))
        data[setting] = {arm: _curves(runs[norm]) for arm, norm in ((BN, "bn"), (PLAIN, "none"))}
    return _result("saturating", comparisons, _mean_over(comparisons, "mean over the networks"),
                   {"curves": data})


def regularizer(runner):
    """Claim 5: a regularizer that reduces the need for dropout."""
    c = runner.config
    comparisons, data = [], {}
    for n in c.subset_sizes:
        end = {}
        for norm in ("bn", "none"):
            for p in (0.0, c.dropout):
                runs = [runner.run(s, c.regularizer_lr, norm=norm, dropout=p, subset=n,
                                   steps=c.regularizer_steps, batch_size=c.regularizer_batch,
                                   eval_every=c.eval_every * 4, probe="train_acc")
                        for s in c.seeds]
                test = np.array([_tail_mean(r["test_acc"]) for r in runs])
                train = np.array([_tail_mean(r["train_acc"]) for r in runs])
                end[norm, p] = test, train - test
        bn_gain = end["bn", c.dropout][0] - end["bn", 0.0][0]
        plain_gain = end["none", c.dropout][0] - end["none", 0.0][0]
        comparisons += [
            Comparison(f"{n} training images, no dropout", "end test accuracy", "higher",
                       end["bn", 0.0][0], end["none", 0.0][0]),
            Comparison(f"{n} training images, no dropout", "train - test accuracy", "lower",
                       end["bn", 0.0][1], end["none", 0.0][1]),
            Comparison(f"{n} training images", f"test accuracy gained by dropout {c.dropout:g}",
                       "lower", bn_gain, plain_gain)]
        data[n] = {f"{BN if norm == 'bn' else PLAIN}{' + dropout' if p else ''}": v
                   for (norm, p), v in end.items()}
    head = [x for x in comparisons if x.metric == "end test accuracy"]
    return _result("regularizer", comparisons,
                   _mean_over(head, "no dropout, mean over " + _settings(c.subset_sizes)
                              + " training images"), {"end": data})


def small_batch(runner):
    """Claim 6 (a weakness): batch norm fails with small batches."""
    c = runner.config
    end, gap = {}, {}
    n_train = len(runner.data(c.seeds[0])[1])
    large = max(c.batch_sizes)
    for b in c.batch_sizes:
        # (arm, normalization, batch size): ghost takes batches of the largest size and
        # normalizes groups of b samples in them
        for arm, norm, size in ((BN, "bn", b), ("BatchRenorm", "renorm", b),
                                ("ghost", ("ghost", b) if b < large else "bn", large),
                                (PLAIN, "none", b)):
            steps = c.small_batch_epochs * (n_train // size)
            runs = [runner.run(s, c.small_batch_lr, norm=norm, batch_size=size, steps=steps,
                               eval_every=max(1, steps // 50)) for s in c.seeds]
            end[arm, b] = np.array([r["end_acc"] for r in runs])
            if arm != PLAIN:
                gap[arm, b] = np.array([r["end_batch_acc"] for r in runs]) - end[arm, b]
    small = [b for b in c.batch_sizes if b < large]
    comparisons = [Comparison(f"batch {b}", "end test accuracy", "lower", end[BN, b],
                              end[PLAIN, b]) for b in small]
    extra = [Comparison(f"batch {b}, {arm} instead of {BN}", "end test accuracy", "lower",
                        end[arm, b], end[PLAIN, b]) for arm in ("BatchRenorm", "ghost")
             for b in small]
    return _result("small-batch", comparisons,
                   _mean_over(comparisons, "mean over batch " + _settings(small)),
                   {"batch_sizes": np.array(c.batch_sizes), "end": end, "gap": gap,
                    "large": large}, arms=(BN, "no normalization"), extra=extra)


def _mismatch_runs(runner):
    c = runner.config
    return {(lr, b): [runner.run(s, lr, batch_size=b, probe="modes",
                                 eval_every=c.mismatch_eval_every) for s in c.seeds]
            for lr, b in c.mismatch}


def _mode_comparisons(runs, metric, direction, arm, other, last=False):
    """One Comparison per mismatch setting of probe ``arm`` against ``other``:
    their final values (``last``) or their means along training, per seed."""
    value = (lambda r, k: r[k][-1]) if last else (lambda r, k: np.mean(r[k]))
    return [Comparison(f"lr {lr:g}, batch {b}", metric, direction,
                       [value(r, arm) for r in rs], [value(r, other) for r in rs])
            for (lr, b), rs in runs.items()]


def mismatch(runner):
    """Claim 7 (a weakness): evaluation mode (running statistics) is less accurate than
    training mode (batch statistics) along training."""
    runs = _mismatch_runs(runner)
    comparisons = _mode_comparisons(runs, "mean test accuracy along training", "lower",
                                    "test_acc", "batch_acc")
    return _result("mismatch", comparisons, _mean_over(comparisons, "mean over the settings"),
                   {"curves": {k: _curves(v) for k, v in runs.items()}},
                   arms=("running statistics", "batch statistics"))


def precise(runner):
    """Claim 7's remedy: recomputing the population statistics after training."""
    runs = _mismatch_runs(runner)
    comparisons = _mode_comparisons(runs, "test accuracy after training", "higher",
                                    "precise_acc", "test_acc", last=True)
    along = _mode_comparisons(runs, "mean test accuracy along training", "higher",
                              "precise_acc", "test_acc")
    return _result("precise", comparisons, _mean_over(comparisons, "mean over the settings"),
                   {"curves": {k: _curves(v) for k, v in runs.items()}},
                   arms=("precise statistics", "running statistics"), extra=along)


#: name -> (the claim, experiment(runner) -> ClaimResult), in table order.
CLAIMS = {
    "speed": ("batch norm reaches the target accuracy in fewer steps (MLP)", speed),
    "lr": ("batch norm trains at higher learning rates (MLP)", learning_rates),
    "init": ("batch norm makes training less sensitive to the initial weight scale",
             init_scale),
    "saturating": ("batch norm trains deep networks with saturating nonlinearities",
                   saturating),
    "regularizer": ("batch norm regularizes, reducing the need for dropout", regularizer),
    "small-batch": ("weakness: batch norm falls behind no normalization with small batches",
                    small_batch),
    "mismatch": ("weakness: evaluation mode (running statistics) is less accurate than "
                 "training mode (batch statistics)", mismatch),
    "precise": ("remedy: statistics recomputed after training beat the running averages",
                precise),
    "cnn-speed": ("batch norm reaches the target accuracy in fewer steps (CNN)",
                  lambda runner: speed(runner, "cnn")),
    "cnn-lr": ("batch norm trains at higher learning rates (CNN)",
               lambda runner: learning_rates(runner, "cnn")),
}


def run_claims(names, config=FULL, log=print):
    """Run the named claims' experiments in order.

    Parameters
    ----------
    names : sequence of str
        Keys of :data:`CLAIMS`.
    config : Config
        The sizes.
    log : callable
        Receives one progress line per finished claim.

    Returns
    -------
    list of ClaimResult
    """
    runner = Runner(config)
    results = []
    for name in names:
        t0 = time.perf_counter()
        result = CLAIMS[name][1](runner)
        result.seconds = time.perf_counter() - t0
        results.append(result)
        log(f"  {name}: {result.verdict} ({result.seconds:.1f} s)")
    return results
