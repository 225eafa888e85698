"""``python -m nbbn demo``: does batch norm let a network train faster, and at higher
learning rates? Train the NumPy MLP of :mod:`nbbn.programs.mlp` on scikit-learn's bundled
handwritten digits with and without BatchNorm, at a low and a high learning rate, from the
same initial weights and the same batches, and compare.

With ``--claims`` (or ``--claim NAME``, repeatable) it tests batch norm's claims instead,
each with a verdict (:mod:`nbbn.programs.claims`, docs/claims.md).

Needs the optional extra ``demo`` (scikit-learn for the data, matplotlib for ``--plot``).
"""
import argparse
import time

import numpy as np

from .digits import load_digits_split
from .mlp import MLP, fit

__all__ = ["train", "run", "plot", "format_table", "add_arguments", "main"]

#: Test accuracy the "steps to reach" column counts up to.
TARGET = 0.9


def train(data, *, batch_norm, lr, steps=500, batch_size=64, hidden=(128, 64), seed=0,
          eval_every=5, target=TARGET):
    """Train one MLP with plain SGD and record its curves.

    Parameters
    ----------
    data : tuple
        ``(x_train, y_train, x_test, y_test)``.
    batch_norm : bool
        BatchNorm after each hidden Linear, or not.
    lr : float
        SGD learning rate.
    steps, batch_size : int
        Number of SGD steps and samples per step (batches drawn by epochs of
        a permutation seeded with ``seed``: the same for every model).
    hidden : tuple of int
        Hidden widths.
    seed : int
        Seed of the initial weights and of the batch order.
    eval_every : int
        Test accuracy is measured (in eval mode) every this many steps.
    target : float
        Test accuracy whose first crossing is reported.

    Returns
    -------
    dict
        ``loss`` (training loss per step), ``eval_steps`` and ``test_acc``
        (the curve), ``final_acc``, ``steps_to_target`` (None if never),
        ``diverged_at`` (first step with a non-finite loss, or None) and
        ``seconds``.
    """
    x_tr, y_tr = data[0], data[1]
    net = MLP([x_tr.shape[1], *hidden, int(y_tr.max()) + 1], batch_norm, seed=seed,
              dtype=x_tr.dtype)
    r = fit(net, data, lr=lr, steps=steps, batch_size=batch_size, seed=seed,
            eval_every=eval_every, target=target)
    return {"batch_norm": bool(batch_norm), "lr": float(lr), **r}


def _warm_up(dtype, hidden):
    """Compile (or load from numba's cache) the kernels the demo uses; return seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    net = MLP([4, *hidden, 3], True, dtype=dtype)
    net.backward(net.forward(rng.standard_normal((8, 4)).astype(dtype)))
    net.eval().forward(rng.standard_normal((8, 4)).astype(dtype))
    return time.perf_counter() - t0


def run(*, lrs=(0.03, 2.0), steps=500, batch_size=64, hidden=(128, 64), seed=0,
        eval_every=5, log=print):
    """Train the four models (without and with BatchNorm, at each learning rate).

    Returns
    -------
    results : list of dict
        One :func:`train` result per model, in table order.
    timing : dict
        ``warm_up`` (kernel compile or cache load) and ``train`` seconds.
    """
    data = load_digits_split(seed)
    warm = _warm_up(data[0].dtype, hidden)
    log(f"digits: {len(data[1])} train / {len(data[3])} test images; MLP 64-"
        f"{'-'.join(map(str, hidden))}-10, SGD, batch {batch_size}, {steps} steps, seed {seed}")
    results = []
    t0 = time.perf_counter()
    for lr in lrs:
        for bn in (False, True):
            r = train(data, batch_norm=bn, lr=lr, steps=steps, batch_size=batch_size,
                      hidden=hidden, seed=seed, eval_every=eval_every)
            results.append(r)
            log(f"  trained {'BatchNorm' if bn else 'plain':9s} lr={lr:g} in {r['seconds']:.1f} s")
    return results, {"warm_up": warm, "train": time.perf_counter() - t0}


def format_table(results, target=TARGET):
    """The results as a Markdown table (readable in a terminal too)."""
    lines = [f"| model | learning rate | final test accuracy | best test accuracy (step) |"
             f" steps to {target:.0%} test accuracy | train loss, last 20 steps |",
             "|---|---|---|---|---|---|"]
    for r in results:
        name = "MLP + BatchNorm" if r["batch_norm"] else "MLP"
        if r["diverged_at"] is not None:
            acc, loss = f"diverged (step {r['diverged_at']})", "nan"
        else:
            acc = f"{r['final_acc']:.3f}"
            loss = f"{np.mean(r['loss'][-20:]):.3f}"
        best = "-"
        if r["test_acc"]:
            i = int(np.argmax(r["test_acc"]))
            best = f"{r['test_acc'][i]:.3f} ({r['eval_steps'][i]})"
        reached = "never" if r["steps_to_target"] is None else str(r["steps_to_target"])
        lines.append(f"| {name} | {r['lr']:g} | {acc} | {best} | {reached} | {loss} |")
    return "\n".join(lines)


def plot(results, path, target=TARGET):
    """Write the training-loss and test-accuracy curves of ``results`` as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'nbbn[demo]'") from e
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {}
    for r in results:
        lr = r["lr"]
        color = colors.setdefault(lr, f"C{len(colors)}")
        style = "-" if r["batch_norm"] else "--"
        label = f"{'BatchNorm' if r['batch_norm'] else 'plain'}, lr={lr:g}"
        loss = np.asarray(r["loss"], dtype=np.float64)
        k = min(10, len(loss))                             # moving average over 10 steps
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if k else loss
        ax_loss.plot(np.arange(k, len(loss) + 1), smooth, style, color=color, label=label)
        ax_acc.plot(r["eval_steps"], r["test_acc"], style, color=color, label=label)
    ax_loss.set(xlabel="SGD step", ylabel="training loss (10-step mean)", yscale="log",
                title="training loss")
    ax_acc.axhline(target, color="grey", lw=0.8, ls=":")
    ax_acc.set(xlabel="SGD step", ylabel="test accuracy", ylim=(0, 1), title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    fig.suptitle("MLP on sklearn digits: with (solid) and without (dashed) nbbn.BatchNorm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The plain demo's options and their defaults (None in the parser, so that
#: ``--claims`` can tell which were given).
_DEFAULTS = {"steps": 500, "lr": [0.03, 2.0], "batch_size": 64, "eval_every": 5, "seed": 0}


def add_arguments(parser):
    """Add the demo's options to an ``argparse`` parser."""
    from .claims_experiments import CLAIMS
    parser.add_argument("--steps", type=int, help="SGD steps per model (500)")
    parser.add_argument("--lr", type=float, nargs="+", metavar="LR",
                        help="learning rates, each run with and without BatchNorm (0.03 2.0)")
    parser.add_argument("--batch-size", type=int, help="samples per step (64)")
    parser.add_argument("--eval-every", type=int,
                        help="measure test accuracy every this many steps (5)")
    parser.add_argument("--seed", type=int, help="seed of weights, batches, split (0)")
    parser.add_argument("--plot", metavar="PATH",
                        help="write the curves as a PNG here (with --claims: a folder, "
                             "one PNG per claim)")
    claims = parser.add_argument_group(
        "claims", "test batch norm's claims instead, with a verdict table (docs/claims.md)")
    claims.add_argument("--claims", action="store_true", help="run every claim's experiment")
    claims.add_argument("--claim", action="append", choices=list(CLAIMS), metavar="NAME",
                        help="run this claim only (repeatable): " + ", ".join(CLAIMS))
    claims.add_argument("--seeds", type=int, metavar="N",
                        help="seeds 0 to N-1 for every setting (3)")
    claims.add_argument("--tiny", action="store_true",
                        help="a smoke test at tiny sizes: the numbers mean nothing")
    return parser


def main(args):
    """Run the demo from parsed ``args`` (see :func:`add_arguments`); return 0."""
    import importlib.util
    needed = ["sklearn"] + (["matplotlib"] if args.plot else [])
    claims = args.claims or bool(args.claim)
    if not claims and (args.tiny or args.seeds is not None):
        raise SystemExit("demo: --tiny and --seeds go with --claims or --claim")
    if claims:
        given = [f"--{k.replace('_', '-')}" for k in _DEFAULTS if getattr(args, k) is not None]
        if given:
            raise SystemExit(f"demo: {', '.join(given)} set the plain demo; --claims and "
                             f"--claim take --seeds, --tiny and --plot DIR")
        if args.seeds is not None and args.seeds < 1:
            raise SystemExit(f"demo: expected --seeds >= 1, got {args.seeds}")
    for k, v in _DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.batch_size < 2 or args.eval_every < 1 or min(args.lr) <= 0:
        raise SystemExit(f"demo: expected --steps >= 1, --batch-size >= 2, --eval-every >= 1 "
                         f"and --lr > 0, got {args.steps}, {args.batch_size}, "
                         f"{args.eval_every}, {args.lr}")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"demo: {' and '.join(missing)} not installed: pip install 'nbbn[demo]'")
    if claims:
        return _main_claims(args)
    results, timing = run(lrs=tuple(args.lr), steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed, eval_every=args.eval_every)
    print()
    print(format_table(results))
    print(f"\ntraining: {timing['train']:.1f} s for {len(results)} models; numba warm-up "
          f"(compile, or load from cache): {timing['warm_up']:.1f} s")
    if args.plot:
        plot(results, args.plot)
        print(f"curves written to {args.plot}")
    return 0


def _main_claims(args):
    """``--claims`` / ``--claim NAME``: run the experiments, print the tables, plot."""
    import dataclasses

    from .claims import FULL, TINY, format_details, format_verdicts
    from .claims_experiments import CLAIMS, run_claims
    names = [n for n in CLAIMS if n in (args.claim or CLAIMS)]
    config = TINY if args.tiny else FULL
    if args.seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(range(args.seeds)))
    print(f"claims: {', '.join(names)}; seeds {', '.join(map(str, config.seeds))}"
          f"{' (tiny sizes: a smoke test)' if args.tiny else ''}")
    t0 = time.perf_counter()
    warm = _warm_up(np.float32, config.hidden)
    results = run_claims(names, config)
    for r in results:
        print()
        print(format_details(r))
    print()
    print(format_verdicts(results))
    print(f"\n{len(results)} claims in {time.perf_counter() - t0:.1f} s (numba warm-up, "
          f"compile or load from cache: {warm:.1f} s)")
    if args.plot:
        from .claims_plots import plot_claims
        paths = plot_claims(results, args.plot)
        print(f"{len(paths)} figures written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(prog="nbbn.demo")).parse_args()))
