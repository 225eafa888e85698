"""A small multilayer perceptron in NumPy, with nbbn's BatchNorm between its layers, and
the plain-SGD loop that trains it (and the CNN of :mod:`nbbn.programs.cnn`).

The network is ``Linear -> BatchNorm -> activation [-> Dropout]`` for each hidden layer,
then a final ``Linear``; without batch norm the hidden ``Linear`` layers carry a bias
instead. Every gradient is computed by hand, and the batch norm ones by
:meth:`nbbn.BatchNorm.backward`. It is what ``python -m nbbn demo`` trains, and small
enough to read in one go::

    net = MLP([64, 128, 64, 10], batch_norm=True, seed=0)
    logits = net.forward(x)                      # training mode: batch statistics
    loss, dlogits = cross_entropy(logits, labels)
    net.backward(dlogits)                        # fills net.gradients()
    net.sgd_step(0.1)                            # p -= 0.1 * grad, in place
    net.eval(); accuracy(net.forward(x_test), y_test)
"""
import time
import warnings

import numpy as np

from .. import BatchNorm

__all__ = ["Linear", "ReLU", "Sigmoid", "Tanh", "Dropout", "Network", "MLP", "cross_entropy",
           "accuracy", "fit"]


class Linear:
    """``y = x @ weight.T + bias``, with torch's weight layout (out, in).

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    bias : bool
        Add a learned bias (initially 0).
    rng : numpy.random.Generator
        Draws the He-normal initial weight, ``N(0, 2 / in_features)``.
    dtype : numpy dtype
        dtype of the parameters.
    init_scale : float
        Multiplies the initial weight (1: He init).
    """

    def __init__(self, in_features, out_features, bias, rng, dtype=np.float64, init_scale=1.0):
        std = np.sqrt(2.0 / in_features) * init_scale
        self.weight = (rng.standard_normal((out_features, in_features)) * std).astype(dtype)
        self.bias = np.zeros(out_features, dtype) if bias else None
        self.grad_weight = self.grad_bias = None
        self._x = None

    def forward(self, x):
        """Return ``x @ weight.T + bias`` and remember ``x`` for the backward."""
        self._x = x
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, dy):
        """Set ``grad_weight`` (and ``grad_bias``); return the input gradient."""
        self.grad_weight = dy.T @ self._x
        if self.bias is not None:
            self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight

    def parameters(self):
        """The learned arrays (live references)."""
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def gradients(self):
        """Gradients matching :meth:`parameters`, from the last backward."""
        return [self.grad_weight] + ([] if self.bias is None else [self.grad_bias])


class _Pointwise:
    """An elementwise activation without parameters; the backward uses the saved output."""

    def __init__(self):
        self._y = None

    def forward(self, x):
        """Return ``f(x)``."""
        self._y = self._f(x)
        return self._y

    def backward(self, dy):
        """Return ``dy * f'(x)``, with ``f'`` computed from the saved output."""
        return (dy * self._df(self._y)).astype(dy.dtype, copy=False)

    def parameters(self):
        """No parameters."""
        return []

    def gradients(self):
        """No parameters."""
        return []


class ReLU(_Pointwise):
    """``max(x, 0)``; the backward recovers the mask from the saved output."""

    def forward(self, x):
        """Return ``max(x, 0)``."""
        self._y = np.maximum(x, 0)
        return self._y

    def backward(self, dy):
        """Return ``dy`` where the output was positive, 0 elsewhere."""
        return np.where(self._y > 0, dy, 0).astype(dy.dtype, copy=False)


class Sigmoid(_Pointwise):
    """``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x / 2)) / 2`` (no overflow)."""

    @staticmethod
    def _f(x):
        return (np.tanh(x * x.dtype.type(0.5)) + 1) * x.dtype.type(0.5)

    @staticmethod
    def _df(y):
        return y * (1 - y)


class Tanh(_Pointwise):
    """``tanh(x)``."""

    _f = staticmethod(np.tanh)

    @staticmethod
    def _df(y):
        return 1 - y * y


class Dropout:
    """Inverted dropout: in training, zero each value with probability ``p`` and scale
    the rest by ``1 / (1 - p)``; in evaluation, the identity.

    Parameters
    ----------
    p : float
        Drop probability, in [0, 1).
    rng : numpy.random.Generator
        Draws the masks.
    """

    def __init__(self, p, rng):
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng, self.training = float(p), rng, True
        self._scale = None

    def train(self, mode=True):
        """Set training (dropping) or evaluation (identity) mode."""
        self.training = bool(mode)

    def forward(self, x):
        """Return ``x`` with a random fraction ``p`` zeroed and the rest scaled (training)."""
        if not self.training or self.p == 0:
            self._scale = None
            return x
        keep = self.rng.random(x.shape) >= self.p
        self._scale = keep.astype(x.dtype) / x.dtype.type(1 - self.p)
        return x * self._scale

    def backward(self, dy):
        """Return ``dy`` through the same mask and scale."""
        return dy if self._scale is None else dy * self._scale

    def parameters(self):
        """No parameters."""
        return []

    def gradients(self):
        """No parameters."""
        return []


class _Norm:
    """Adapts a BatchNorm-like layer (``forward``, ``backward``, ``gamma``, ``beta``,
    ``grad_gamma``, ``grad_beta``, ``train``) to the layer protocol of this module."""

    def __init__(self, bn):
        self.bn = bn

    def train(self, mode=True):
        self.bn.train(mode)

    def forward(self, x):
        return self.bn.forward(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def parameters(self):
        return [self.bn.gamma, self.bn.beta] if self.bn.affine else []

    def gradients(self):
        return [self.bn.grad_gamma, self.bn.grad_beta] if self.bn.affine else []


_ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


class Network:
    """A stack of layers, trained together: the base of :class:`MLP` and
    :class:`nbbn.programs.cnn.CNN`.

    Attributes
    ----------
    layers : list
        The layers in order; each has ``forward``, ``backward``,
        ``parameters()`` and ``gradients()``, and those with a mode ``train(mode)``.
    norms : list
        The normalization layers (empty without batch norm).
    """

    layers = norms = ()

    def _add_norm(self, norm):
        """Append ``norm`` (a BatchNorm-like layer) to :attr:`norms` and to the layers."""
        self.norms.append(norm)
        self.layers.append(_Norm(norm))

    def train(self, mode=True):
        """Set training mode (batch statistics in the norms, dropout on); return self."""
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics in the norms, no dropout); return self."""
        return self.train(False)

    def forward(self, x):
        """Return the logits for a batch ``x``."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dlogits):
        """Backpropagate the logits' gradient; return the input gradient.

        Must follow a training-mode :meth:`forward` of the same batch.
        """
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def parameters(self):
        """Every learned array, in a fixed order (live references)."""
        return [p for layer in self.layers for p in layer.parameters()]

    def gradients(self):
        """The gradients of :meth:`parameters`, same order, from the last backward."""
        return [g for layer in self.layers for g in layer.gradients()]

    def sgd_step(self, lr):
        """Plain SGD: ``p -= lr * grad`` for every parameter, in place."""
        for p, g in zip(self.parameters(), self.gradients()):
            p -= (lr * g).astype(p.dtype, copy=False)


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class MLP(Network):
    """A multilayer perceptron:
    ``(Linear -> BatchNorm -> activation [-> Dropout]) * hidden -> Linear``.

    Parameters
    ----------
    sizes : sequence of int
        Widths from input to output, e.g. ``[64, 128, 64, 10]`` for two hidden
        layers of 128 and 64 units.
    batch_norm : bool
        Put a batch norm after each hidden ``Linear`` (which then has no bias,
        as beta takes its place). Without it, each hidden ``Linear`` has a bias.
    seed : int
        Seed of the initial weights (and of the dropout masks): two networks with
        the same ``sizes``, ``seed`` and ``init_scale`` start with the same
        ``Linear`` weights, with or without batch norm or dropout.
    dtype : {numpy.float32, numpy.float64}
        dtype of every parameter; feed inputs of this dtype.
    make_norm : callable, optional
        ``make_norm(num_features)`` returns the normalization layer to use
        (anything with BatchNorm's interface, e.g.
        ``lambda c: nbbn.SyncBatchNorm(c, comm=comm)``); the default is
        ``nbbn.BatchNorm(num_features, dtype=dtype)``. Used only with
        ``batch_norm=True``.
    activation : {'relu', 'sigmoid', 'tanh'}
        The hidden layers' nonlinearity.
    dropout : float
        Drop probability of a :class:`Dropout` after each hidden activation
        (0: none).
    init_scale : float
        Multiplies every initial ``Linear`` weight (1: He init).
    """

    def __init__(self, sizes, batch_norm=True, *, seed=0, dtype=np.float64, make_norm=None,
                 activation="relu", dropout=0.0, init_scale=1.0):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least 2 positive widths, got {sizes}")
        dtype = _check_dtype(dtype)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {activation!r}")
        if make_norm is None:
            def make_norm(c):
                return BatchNorm(c, dtype=dtype)
        rng, drop_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
        self.dtype, self.batch_norm = dtype, bool(batch_norm)
        self.layers, self.norms = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            hidden = i < len(sizes) - 2
            self.layers.append(Linear(fan_in, fan_out, not (hidden and self.batch_norm), rng,
                                      dtype, init_scale))
            if hidden:
                if self.batch_norm:
                    self._add_norm(make_norm(fan_out))
                self.layers.append(_ACTIVATIONS[activation]())
                if dropout:
                    self.layers.append(Dropout(dropout, drop_rng))


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    Parameters
    ----------
    logits : ndarray of shape (N, K)
    labels : ndarray of int of shape (N,)
        Classes in ``range(K)``.

    Returns
    -------
    loss : float
        ``mean(-log softmax(logits)[n, labels[n]])``.
    dlogits : ndarray of shape (N, K)
        ``(softmax(logits) - onehot(labels)) / N``, in the dtype of ``logits``.
    """
    n = logits.shape[0]
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -float(log_p[rows, labels].mean())
    d = np.exp(log_p)
    d[rows, labels] -= 1.0
    return loss, (d / n).astype(logits.dtype)


def accuracy(logits, labels):
    """Fraction of rows whose largest logit is at the label."""
    return float((np.argmax(logits, axis=1) == labels).mean())


def fit(net, data, *, lr, steps, batch_size=64, seed=0, eval_every=5, target=None,
        on_eval=None):
    """Train ``net`` with plain SGD on softmax cross-entropy and record its curves.

    Parameters
    ----------
    net : Network
        The network, trained in place; left in evaluation mode.
    data : tuple
        ``(x_train, y_train, x_test, y_test)``.
    lr : float
        SGD learning rate.
    steps, batch_size : int
        Number of SGD steps and samples per step. Batches are drawn by epochs
        of a permutation from ``default_rng(seed + 1)`` (a partial last batch
        is skipped), so runs with the same ``seed`` see the same batches.
    seed : int
        The run's seed (the weights' seed, by convention).
    eval_every : int
        Test accuracy is measured (in eval mode) every this many steps and at
        the last step.
    target : float, optional
        Test accuracy whose first crossing is reported.
    on_eval : callable, optional
        ``on_eval(net, step) -> dict`` of floats, called after each test
        accuracy measurement; its values are collected in lists under its keys.

    Returns
    -------
    dict
        ``loss`` (training loss per step), ``eval_steps`` and ``test_acc``
        (the curve), ``final_acc`` (NaN if diverged), ``steps_to_target``
        (None if never), ``diverged_at`` (first step with a non-finite loss, or
        None), ``seconds``, and ``on_eval``'s lists.
    """
    x_tr, y_tr, x_te, y_te = data
    order_rng = np.random.default_rng(seed + 1)
    order, pos = order_rng.permutation(len(y_tr)), 0
    out = {"loss": [], "eval_steps": [], "test_acc": []}
    reached = diverged = None
    t0 = time.perf_counter()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # a diverged batch norm warns
        for step in range(1, steps + 1):
            if pos + batch_size > len(order):
                order, pos = order_rng.permutation(len(y_tr)), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            net.train()
            loss, dlogits = cross_entropy(net.forward(x_tr[idx]), y_tr[idx])
            out["loss"].append(loss)
            if not np.isfinite(loss):
                diverged = step
                break
            net.backward(dlogits)
            net.sgd_step(lr)
            if step % eval_every == 0 or step == steps:
                acc = accuracy(net.eval().forward(x_te), y_te)
                out["eval_steps"].append(step)
                out["test_acc"].append(acc)
                if reached is None and target is not None and acc >= target:
                    reached = step
                for key, value in (on_eval(net, step) if on_eval else {}).items():
                    out.setdefault(key, []).append(value)
    net.eval()
    final = out["test_acc"][-1] if out["test_acc"] and diverged is None else float("nan")
    out.update(final_acc=final, steps_to_target=reached, diverged_at=diverged,
               seconds=time.perf_counter() - t0)
    return out
