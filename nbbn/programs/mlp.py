"""A small multilayer perceptron in NumPy, with nbbn's BatchNorm between its layers.

The network is ``Linear -> BatchNorm -> ReLU`` for each hidden layer, then a final
``Linear``; without batch norm the hidden ``Linear`` layers carry a bias instead. Every
gradient is computed by hand, and the batch norm ones by :meth:`nbbn.BatchNorm.backward`.
It is what ``python -m nbbn demo`` trains, and small enough to read in one go::

    net = MLP([64, 128, 64, 10], batch_norm=True, seed=0)
    logits = net.forward(x)                      # training mode: batch statistics
    loss, dlogits = cross_entropy(logits, labels)
    net.backward(dlogits)                        # fills net.gradients()
    net.sgd_step(0.1)                            # p -= 0.1 * grad, in place
    net.eval(); accuracy(net.forward(x_test), y_test)
"""
import numpy as np

from ..batchnorm import BatchNorm

__all__ = ["Linear", "ReLU", "MLP", "cross_entropy", "accuracy"]


class Linear:
    """``y = x @ weight.T + bias``, with torch's weight layout (out, in).

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    bias : bool
        Add a learned bias.
    rng : numpy.random.Generator
        Draws the He-normal initial weight, ``N(0, 2 / in_features)``.
    dtype : numpy dtype
        dtype of the parameters.
    """

    def __init__(self, in_features, out_features, bias, rng, dtype=np.float64):
        std = np.sqrt(2.0 / in_features)
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


class ReLU:
    """``max(x, 0)``; the backward recovers the mask from the saved output."""

    def __init__(self):
        self._y = None

    def forward(self, x):
        """Return ``max(x, 0)``."""
        self._y = np.maximum(x, 0)
        return self._y

    def backward(self, dy):
        """Return ``dy`` where the output was positive, 0 elsewhere."""
        return np.where(self._y > 0, dy, 0).astype(dy.dtype, copy=False)

    def parameters(self):
        """ReLU has no parameters."""
        return []

    def gradients(self):
        """ReLU has no parameters."""
        return []


class _Norm:
    """Adapts a BatchNorm-like layer (``forward``, ``backward``, ``gamma``, ``beta``,
    ``grad_gamma``, ``grad_beta``, ``train``) to the layer protocol of this module."""

    def __init__(self, bn):
        self.bn = bn

    def forward(self, x):
        return self.bn.forward(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def parameters(self):
        return [self.bn.gamma, self.bn.beta] if self.bn.affine else []

    def gradients(self):
        return [self.bn.grad_gamma, self.bn.grad_beta] if self.bn.affine else []


class MLP:
    """A multilayer perceptron: ``(Linear -> BatchNorm -> ReLU) * hidden -> Linear``.

    Parameters
    ----------
    sizes : sequence of int
        Widths from input to output, e.g. ``[64, 128, 64, 10]`` for two hidden
        layers of 128 and 64 units.
    batch_norm : bool
        Put a batch norm after each hidden ``Linear`` (which then has no bias,
        as beta takes its place). Without it, each hidden ``Linear`` has a bias.
    seed : int
        Seed of the initial weights: two networks with the same ``sizes`` and
        ``seed`` start with the same ``Linear`` weights, with or without batch norm.
    dtype : {numpy.float32, numpy.float64}
        dtype of every parameter; feed inputs of this dtype.
    make_norm : callable, optional
        ``make_norm(num_features)`` returns the normalization layer to use
        (anything with BatchNorm's interface, e.g.
        ``lambda c: nbbn.SyncBatchNorm(c, comm=comm)``); the default is
        ``nbbn.BatchNorm(num_features, dtype=dtype)``. Used only with
        ``batch_norm=True``.

    Attributes
    ----------
    layers : list
        The layers in order; each has ``forward``, ``backward``,
        ``parameters()`` and ``gradients()``.
    norms : list
        The normalization layers (empty without batch norm).
    """

    def __init__(self, sizes, batch_norm=True, *, seed=0, dtype=np.float64, make_norm=None):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least 2 positive widths, got {sizes}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if make_norm is None:
            def make_norm(c):
                return BatchNorm(c, dtype=dtype)
        rng = np.random.default_rng(seed)
        self.dtype, self.batch_norm = dtype, bool(batch_norm)
        self.layers, self.norms = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            hidden = i < len(sizes) - 2
            self.layers.append(Linear(fan_in, fan_out, not (hidden and self.batch_norm), rng,
                                      dtype))
            if hidden:
                if self.batch_norm:
                    norm = make_norm(fan_out)
                    self.norms.append(norm)
                    self.layers.append(_Norm(norm))
                self.layers.append(ReLU())

    def train(self, mode=True):
        """Set training mode (batch statistics in the norms); return self."""
        for norm in self.norms:
            norm.train(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics in the norms); return self."""
        return self.train(False)

    def forward(self, x):
        """Return the logits for a batch ``x`` of shape (N, sizes[0])."""
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
