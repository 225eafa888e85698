"""The figures of ``python -m nbbn demo --claims --plot DIR``: one PNG per claim, drawn
from :attr:`nbbn.programs.claims.ClaimResult.data` (matplotlib, Agg backend)."""
import os

import numpy as np

__all__ = ["plot_claims"]

STYLE = {"BatchNorm": ("C0", "-"), "plain": ("C1", "--"), "no normalization": ("C1", "--"),
         "BatchRenorm": ("C2", "-"), "ghost": ("C3", "-."),
         "running statistics": ("C0", "-"), "batch statistics": ("C1", "--"),
         "precise statistics": ("C2", ":")}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'nbbn[demo]'") from e
    return plt


def plot_claims(results, directory):
    """Write ``DIRECTORY/<claim>.png`` for each result; return the paths."""
    os.makedirs(directory, exist_ok=True)
    plt = _pyplot()
    paths = []
    for r in results:
        fig = _DRAW[r.name](plt, r)
        fig.suptitle(f"{r.name}: {r.claim} — {r.verdict}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, f"{r.name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _panels(plt, n, width=4.0, height=3.3):
    fig, axes = plt.subplots(1, n, figsize=(width * n + 0.5, height), squeeze=False)
    return fig, list(axes[0])


def _seed_curves(ax, runs, key, label, x="eval_steps"):
    """Each seed thin, the mean over seeds (where every seed has a value) thick."""
    color, style = STYLE[label]
    n = min(len(r[key]) for r in runs)
    for r in runs:
        ax.plot(r[x][:len(r[key])], r[key], style, color=color, lw=0.6, alpha=0.35)
    if n:
        ax.plot(runs[0][x][:n], np.mean([r[key][:n] for r in runs], axis=0), style,
                color=color, lw=1.6, label=label)


def _against(ax, x, values, label):
    """Mean over seeds (rows) against ``x``, with the range over seeds as error bars."""
    color, style = STYLE[label]
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(axis=0)
    ax.errorbar(x, mean, yerr=[mean - values.min(axis=0), values.max(axis=0) - mean],
                fmt="o" + style, color=color, label=label, capsize=3, ms=4)


def _finish(ax, xlabel, ylabel, title=None, ylim=(0, 1.02), target=None, logx=False):
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=ylim)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _test_curves(plt, r, title, target=None):
    """One panel per setting of ``r.data['curves']``: test accuracy along training."""
    curves = r.data["curves"]
    fig, axes = _panels(plt, len(curves))
    for ax, (setting, arms) in zip(axes, curves.items()):
        for arm, runs in arms.items():
            _seed_curves(ax, runs, "test_acc", arm)
        _finish(ax, "SGD step", "test accuracy (eval mode)", title(setting), target=target)
    return fig


def _speed(plt, r):
    return _test_curves(plt, r, lambda lr: f"lr {lr:g}", target=r.data["target"])


def _lr(plt, r):
    fig, (ax,) = _panels(plt, 1, width=6)
    for arm in ("BatchNorm", "plain"):
        _against(ax, r.data["lrs"], r.data[arm], arm)
    _finish(ax, "learning rate", "end test accuracy", target=r.data["target"], logx=True)
    return fig


def _init(plt, r):
    fig, (ax,) = _panels(plt, 1, width=6)
    for arm in ("BatchNorm", "plain"):
        _against(ax, r.data["scales"], r.data[arm], arm)
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    _finish(ax, "initial weight scale (x He init)", "end test accuracy", logx=True)
    return fig


def _saturating(plt, r):
    return _test_curves(plt, r, str)


def _regularizer(plt, r):
    end = r.data["end"]
    sizes = list(end)
    arms = list(end[sizes[0]])
    fig, (ax_acc, ax_gap) = _panels(plt, 2, width=5)
    width = 0.8 / len(arms)
    colors = {"BatchNorm": "C0", "BatchNorm + dropout": "#9ecae1", "plain": "C1",
              "plain + dropout": "#fdd0a2"}
    for i, arm in enumerate(arms):
        x = np.arange(len(sizes)) + (i - (len(arms) - 1) / 2) * width
        for ax, j in ((ax_acc, 0), (ax_gap, 1)):
            v = np.array([end[n][arm][j] for n in sizes])       # (sizes, seeds)
            ax.bar(x, v.mean(axis=1), width, yerr=v.std(axis=1, ddof=1) if v.shape[1] > 1
                   else None, label=arm, color=colors[arm], capsize=2)
    for ax, label in ((ax_acc, "end test accuracy"), (ax_gap, "train - test accuracy")):
        ax.set_xticks(range(len(sizes)), [f"{n} training images" for n in sizes])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    lo = min(end[n][a][0].min() for n in sizes for a in arms)
    ax_acc.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax_acc.legend(fontsize=7, loc="upper left", ncol=2)
    return fig


def _small_batch(plt, r):
    d = r.data
    sizes = d["batch_sizes"]
    fig, (ax_acc, ax_gap) = _panels(plt, 2, width=5)
    for arm in ("BatchNorm", "BatchRenorm", "ghost", "plain"):
        label = "no normalization" if arm == "plain" else arm
        _against(ax_acc, sizes, np.stack([d["end"][arm, b] for b in sizes], axis=1), label)
        if arm != "plain":
            _against(ax_gap, sizes, np.stack([d["gap"][arm, b] for b in sizes], axis=1), label)
    for ax in (ax_acc, ax_gap):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
    ax_acc.set_title(f"ghost: batches of {d['large']}, statistics over the batch size",
                     fontsize=9)
    _finish(ax_acc, "batch size", "end test accuracy (eval mode)")
    ax_gap.axhline(0, color="grey", lw=0.8)
    ax_gap.set_title("eval-mode gap: batch-statistics minus eval-mode accuracy", fontsize=9)
    _finish(ax_gap, "batch size", "accuracy difference", ylim=None)
    return fig


def _modes(plt, r):
    curves = r.data["curves"]
    fig, axes = _panels(plt, len(curves))
    keys = [("test_acc", "running statistics"), ("batch_acc", "batch statistics"),
            ("precise_acc", "precise statistics")]
    for ax, ((lr, b), runs) in zip(axes, curves.items()):
        for key, label in keys:
            if key in runs[0]:
                _seed_curves(ax, runs, key, label)
        lo = min(min(run[k]) for run in runs for k, _ in keys if k in run)
        _finish(ax, "SGD step", "test accuracy", f"lr {lr:g}, batch {b}",
                ylim=(max(0.0, lo - 0.02), 1.0))
    return fig


_DRAW = {"speed": _speed, "cnn-speed": _speed, "lr": _lr, "cnn-lr": _lr, "init": _init,
         "saturating": _saturating, "regularizer": _regularizer, "small-batch": _small_batch,
         "mismatch": _modes, "precise": _modes}
