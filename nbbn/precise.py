"""Exact population statistics after training (as fvcore's PreciseBN and
torch's ``swa_utils.update_bn``, but merged exactly instead of averaged)."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np

from ._engine import merge_moments
from .batchnorm import BatchNorm

__all__ = ["precise_statistics"]


class _Recorder:
    """Count, mean and M2 (float64) of every batch a layer normalized, merged in order."""

    def __init__(self, channels):
        self.counts, self.means, self.m2s = [], [], []
        self.channels = channels

    def add(self, mean, var, count):
        self.counts.append(float(count))
        self.means.append(np.asarray(mean, np.float64))
        self.m2s.append(np.asarray(var, np.float64) * count)

    def result(self):
        """``(mean, unbiased variance, count)`` over every recorded value."""
        counts = np.array(self.counts)
        mean, m2 = merge_moments(counts, np.array(self.means), np.array(self.m2s))
        n = counts.sum()
        return mean, m2 / (n - 1), n


@contextlib.contextmanager
def precise_statistics(layers: Iterable[BatchNorm]) -> Iterator[None]:
    """Recompute the running statistics of ``layers`` exactly over the batches
    run through them inside the ``with`` block.

    The exponential running averages trail the network while it trains, and
    evaluation mode then normalizes with statistics the last weights never
    produced. Run the training set (or a large part of it) through the
    network once after training, inside this block::

        with nbbn.precise_statistics(net.norms):
            for xb in batches:
                net.forward(xb)

    Inside the block every layer is in training mode (each batch is
    normalized with its own statistics, as when training; Batch
    Renormalization's corrections are left out) and records the exact
    count, mean and sum of squared deviations of every batch (or ghost
    group) it sees, without touching its running statistics. On leaving the
    block, each layer's ``running_mean`` and ``running_var`` become the mean
    and the unbiased variance over all those values, merged with Chan's
    formula in float64 (what one pass over the concatenated data would give,
    up to rounding); ``num_batches_tracked`` is left as it was, and each
    layer returns to its mode. A :class:`~nbbn.SyncBatchNorm` records the
    statistics of the whole distributed batch, the same on every rank. If
    the block raises, or a layer saw no batch, nothing is changed.

    Parameters
    ----------
    layers : iterable of BatchNorm
        Layers with running statistics (``track_running_stats=True``).

    Raises
    ------
    TypeError
        An item is not a :class:`~nbbn.BatchNorm`.
    ValueError
        A layer keeps no running statistics, is already recording, or saw no
        batch in the block.
    """
    layers = list({id(layer): layer for layer in layers}.values())
    for layer in layers:
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layers must be BatchNorm layers, got {type(layer).__name__}")
        if layer.running_mean is None:
            raise ValueError(f"{layer!r} keeps no running statistics (track_running_stats=False)")
        if layer._recorder is not None:
            raise ValueError(f"{layer!r} is already recording its statistics")
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer._recorder = _Recorder(layer.num_features)
            layer.train()
        yield
        empty = [layer for layer in layers if not layer._recorder.counts]
        if empty:
            raise ValueError(f"{len(empty)} layer(s) saw no batch in the block (first: "
                             f"{empty[0]!r}); their statistics were not changed")
        results = [layer._recorder.result() for layer in layers]
        for layer, (mean, var, _) in zip(layers, results):
            b = layer._backend
            layer.running_mean = b.put(mean.astype(layer.param_dtype))
            layer.running_var = b.put(var.astype(layer.param_dtype))
    finally:
        for layer, mode in zip(layers, modes):
            layer._recorder = None
            layer.train(mode)
