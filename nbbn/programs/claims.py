"""``python -m nbbn demo --claims``: do batch norm's famous claims hold on networks you can
rerun? Each claim is an experiment (:mod:`nbbn.programs.claims_experiments`) that trains the
same networks with and without batch norm, from the same initial weights and batches, over
several seeds and settings; this module holds the sizes, the verdict rule and the tables.

The verdict rule (docs/claims.md): for each setting and seed, the paired difference
``d = (with batch norm) - (without)`` of the claim's metric, signed so that the claimed
direction is positive. A setting is *won* when ``mean(d)`` over the seeds is larger than
its spread, the sample standard deviation of ``d`` over the seeds. A claim *holds* when
every setting is won, *does not hold* when none is, and is *mixed* otherwise.
"""
import dataclasses

import numpy as np

__all__ = ["Comparison", "ClaimResult", "Config", "FULL", "TINY", "verdict",
           "format_verdicts", "format_details"]

HOLDS, FAILS, MIXED = "holds", "does not hold", "mixed"


@dataclasses.dataclass
class Comparison:
    """One metric in one setting, per seed, for the two arms of a claim.

    Parameters
    ----------
    setting : str
        What was varied, e.g. ``"lr 0.1"``.
    metric : str
        What was measured, e.g. ``"steps to 90% test accuracy"``.
    better : {'higher', 'lower'}
        The direction the claim predicts for ``a`` against ``b``.
    a, b : sequence of float
        The metric per seed with batch norm (or the claim's first arm) and
        without (its second arm), the same seeds in the same order.
    fmt : str
        Format of one value, e.g. ``".3f"``.
    """

    setting: str
    metric: str
    better: str
    a: np.ndarray
    b: np.ndarray
    fmt: str = ".3f"

    def __post_init__(self):
        if self.better not in ("higher", "lower"):
            raise ValueError(f"better must be 'higher' or 'lower', got {self.better!r}")
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)
        if self.a.shape != self.b.shape or self.a.ndim != 1 or not len(self.a):
            raise ValueError(f"a and b need one value per seed each, got shapes "
                             f"{self.a.shape} and {self.b.shape}")

    @property
    def difference(self):
        """``a - b`` per seed."""
        return self.a - self.b

    @property
    def won(self):
        """The mean difference is in the claimed direction and larger than its spread."""
        d = self.difference if self.better == "higher" else -self.difference
        return bool(np.mean(d) > spread(d))

    def cells(self):
        """``(a, b, difference)`` as ``mean ± spread`` strings."""
        return tuple(mean_spread(v, self.fmt) for v in (self.a, self.b, self.difference))


def spread(values):
    """Sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_spread(values, fmt=".3f"):
    """``'mean ± spread'`` of ``values``."""
    return f"{np.mean(values):{fmt}} ± {spread(values):{fmt}}"


def verdict(comparisons):
    """``'holds'`` if every comparison is won, ``'does not hold'`` if none is, else ``'mixed'``."""
    won = [c.won for c in comparisons]
    return HOLDS if all(won) else FAILS if not any(won) else MIXED


@dataclasses.dataclass
class ClaimResult:
    """What one claim's experiment found.

    Attributes
    ----------
    name : str
        The claim's command-line name.
    claim : str
        The claim, as one sentence.
    arms : tuple of str
        Names of arm ``a`` and arm ``b`` (usually ``("BatchNorm", "plain")``).
    comparisons : list of Comparison
        The settings the verdict is taken over.
    headline : Comparison
        The summary shown in the verdict table (e.g. the mean over settings).
    data : dict
        Everything the figure needs (curves per arm, setting and seed).
    extra : list of Comparison
        More comparisons, shown in the details but not part of the verdict.
    seconds : float
        Wall time of the experiment.
    """

    name: str
    claim: str
    arms: tuple
    comparisons: list
    headline: Comparison
    data: dict = dataclasses.field(default_factory=dict)
    extra: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self):
        """:func:`verdict` of :attr:`comparisons`."""
        return verdict(self.comparisons)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the experiments. :data:`FULL` is the documented run; :data:`TINY` a
    smoke test whose numbers mean nothing."""

    seeds: tuple = (0, 1, 2)          # each: split, initial weights, batch order, masks
    hidden: tuple = (128, 64)          # the MLP's hidden widths
    steps: int = 500                   # SGD steps per run (speed, lr, init, mismatch)
    eval_every: int = 5                # test accuracy every this many steps
    target: float = 0.9                # the accuracy of "steps to" and of "usable lr"
    speed_lrs: tuple = (0.03, 0.1, 0.3)                      # speed, cnn-speed
    lr_grid: tuple = (0.03, 0.1, 0.3, 1.0, 2.0, 5.0, 10.0)   # lr, cnn-lr
    init_scales: tuple = (0.01, 0.1, 1.0, 10.0, 100.0)       # x He init (1 not counted)
    init_lr: float = 0.1
    saturating: tuple = (("sigmoid", 4), ("sigmoid", 8), ("tanh", 4), ("tanh", 8))
    saturating_width: int = 64         # (activation, hidden layers) of this width
    saturating_steps: int = 1000
    saturating_lr: float = 0.1
    subset_sizes: tuple = (150, 400)   # regularizer: training images
    regularizer_steps: int = 1500
    regularizer_batch: int = 32
    regularizer_lr: float = 0.1
    dropout: float = 0.3
    batch_sizes: tuple = (2, 4, 8, 16, 64)   # small-batch; the largest is the reference
    small_batch_epochs: int = 20
    small_batch_lr: float = 0.05
    mismatch: tuple = ((0.1, 64), (1.0, 64), (5.0, 64), (0.1, 8))   # (lr, batch size)
    mismatch_eval_every: int = 10
    cnn_channels: tuple = (16, 32)
    cnn_steps: int = 500
    cnn_eval_every: int = 10

FULL = Config()
TINY = Config(seeds=(0, 1), hidden=(16, 8), steps=20, eval_every=5, speed_lrs=(0.3,),
              lr_grid=(0.3, 3.0), init_scales=(0.1, 1.0, 10.0), saturating=(("sigmoid", 3),),
              saturating_width=16, saturating_steps=20, subset_sizes=(60,),
              regularizer_steps=20, regularizer_batch=16, batch_sizes=(4, 16),
              small_batch_epochs=1, mismatch=((1.0, 16),), mismatch_eval_every=10,
              cnn_channels=(4, 8), cnn_steps=10, cnn_eval_every=5)


def _arm_cell(value, arm, default):
    return value if arm == default else f"{value} ({arm})"


def format_verdicts(results):
    """The verdict table: one Markdown row per claim."""
    lines = ["| claim | metric | with batch norm | without | difference | settings won | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for r in results:
        h = r.headline
        a, b, d = h.cells()
        won = sum(c.won for c in r.comparisons)
        lines.append(f"| {r.name}: {r.claim} | {h.metric} ({h.setting}; {h.better} is "
                     f"claimed) | {_arm_cell(a, r.arms[0], 'BatchNorm')} | "
                     f"{_arm_cell(b, r.arms[1], 'plain')} | {d} | {won} of "
                     f"{len(r.comparisons)} | **{r.verdict}** |")
    return "\n".join(lines)


def format_details(result):
    """One claim's settings as a Markdown table (mean ± spread over seeds)."""
    a, b = result.arms
    lines = [f"{result.name}: {result.claim}", "",
             f"| setting | metric | {a} | {b} | difference | won |", "|---|---|---|---|---|---|"]
    for c in result.comparisons:
        ca, cb, cd = c.cells()
        lines.append(f"| {c.setting} | {c.metric} ({c.better}) | {ca} | {cb} | {cd} | "
                     f"{'yes' if c.won else 'no'} |")
    for c in result.extra:
        ca, cb, cd = c.cells()
        lines.append(f"| {c.setting} | {c.metric} ({c.better}) | {ca} | {cb} | {cd} | "
                     f"(not counted) |")
    return "\n".join(lines)
