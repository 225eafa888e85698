"""A small convolutional network in NumPy, with nbbn's BatchNorm on its (N, C, H, W)
activations: ``(Conv2d -> BatchNorm -> ReLU -> AvgPool2d) * 2 -> Flatten -> Linear``.

Convolutions are a matmul over the windows of ``numpy.lib.stride_tricks.sliding_window_view``;
every gradient is written by hand (the batch norm ones by :meth:`nbbn.BatchNorm.backward`).
It has the layer protocol of :class:`nbbn.programs.mlp.Network`, so
:func:`nbbn.programs.mlp.fit` trains it::

    net = CNN((1, 8, 8), 10, batch_norm=True, seed=0)
    logits = net.forward(images)                 # images of shape (N, 1, 8, 8)
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import BatchNorm
from .mlp import Linear, Network, ReLU, _check_dtype

__all__ = ["Conv2d", "AvgPool2d", "Flatten", "CNN"]


def _im2col(x, k, p):
    """The (N * H' * W', C * k * k) matrix of the k x k windows of ``x`` (N, C, H, W)
    zero-padded by ``p``: rows (n, i, j), columns (c, ki, kj); and H', W'."""
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    win = sliding_window_view(xp, (k, k), axis=(2, 3))            # (N, C, H', W', k, k)
    ho, wo = win.shape[2:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k), ho, wo


def _to_nchw(rows, n, h, w):
    """(N * H * W, C) rows to a contiguous (N, C, H, W) array."""
    return np.ascontiguousarray(rows.reshape(n, h, w, -1).transpose(0, 3, 1, 2))


class Conv2d:
    """2-D cross-correlation with a square kernel, stride 1 and zero padding, as
    ``torch.nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)``.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, padding : int
        Shapes: the weight is (out_channels, in_channels, kernel_size, kernel_size).
    bias : bool
        Add a learned bias per output channel (initially 0).
    rng : numpy.random.Generator
        Draws the He-normal initial weight, ``N(0, 2 / (in_channels * kernel_size**2))``.
    dtype : numpy dtype
        dtype of the parameters.
    init_scale : float
        Multiplies the initial weight (1: He init).
    """

    def __init__(self, in_channels, out_channels, kernel_size, padding, bias, rng,
                 dtype=np.float64, init_scale=1.0):
        k = int(kernel_size)
        std = np.sqrt(2.0 / (in_channels * k * k)) * init_scale
        self.weight = (rng.standard_normal((out_channels, in_channels, k, k)) * std).astype(dtype)
        self.bias = np.zeros(out_channels, dtype) if bias else None
        self.k, self.padding = k, int(padding)
        self.grad_weight = self.grad_bias = None
        self._cols = self._shape = None

    def forward(self, x):
        """Return the convolution of ``x`` (N, C, H, W): (N, out_channels, H', W')."""
        self._cols, ho, wo = _im2col(x, self.k, self.padding)
        self._shape = x.shape
        y = self._cols @ self.weight.reshape(len(self.weight), -1).T
        if self.bias is not None:
            y += self.bias
        return _to_nchw(y, len(x), ho, wo)

    def backward(self, dy):
        """Set ``grad_weight`` (and ``grad_bias``); return the input gradient."""
        n, c, h, w = self._shape
        p, k = self.padding, self.k
        ho, wo = dy.shape[2:]
        d = dy.transpose(0, 2, 3, 1).reshape(n * ho * wo, -1)
        self.grad_weight = (d.T @ self._cols).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias = d.sum(axis=0)
        dcols = (d @ self.weight.reshape(len(self.weight), -1)).reshape(n, ho, wo, c, k, k)
        dxp = np.zeros((n, c, h + 2 * p, w + 2 * p), dy.dtype)
        for i in range(k):                                       # col2im: add each tap back
            for j in range(k):
                dxp[:, :, i:i + ho, j:j + wo] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, p:p + h, p:p + w] if p else dxp

    def parameters(self):
        """The learned arrays (live references)."""
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def gradients(self):
        """Gradients matching :meth:`parameters`, from the last backward."""
        return [self.grad_weight] + ([] if self.bias is None else [self.grad_bias])


class AvgPool2d:
    """Mean over non-overlapping ``size`` x ``size`` windows (H and W divisible by ``size``)."""

    def __init__(self, size=2):
        self.size = int(size)

    def forward(self, x):
        """Return the window means: (N, C, H / size, W / size)."""
        s = self.size
        y = x[:, :, ::s, ::s].copy()
        for i in range(s):                       # strided adds: faster than mean(axis=(3, 5))
            for j in range(s):
                if i or j:
                    y += x[:, :, i::s, j::s]
        return y * x.dtype.type(1 / (s * s))

    def backward(self, dy):
        """Spread each output gradient evenly over its window."""
        n, c, h, w = dy.shape
        s = self.size
        d = dy * dy.dtype.type(1 / (s * s))
        return np.broadcast_to(d[:, :, :, None, :, None], (n, c, h, s, w, s)).reshape(
            n, c, h * s, w * s)

    def parameters(self):
        """No parameters."""
        return []

    def gradients(self):
        """No parameters."""
        return []


class Flatten:
    """(N, ...) to (N, features)."""

    def __init__(self):
        self._shape = None

    def forward(self, x):
        """Return ``x.reshape(len(x), -1)``."""
        self._shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        """Return ``dy`` in the input's shape."""
        return dy.reshape(self._shape)

    def parameters(self):
        """No parameters."""
        return []

    def gradients(self):
        """No parameters."""
        return []


class CNN(Network):
    """``(Conv2d 3x3 -> BatchNorm -> ReLU -> AvgPool2d 2) * len(channels) -> Flatten ->
    Linear``.

    Parameters
    ----------
    input_shape : tuple of int
        (C, H, W) of one image; H and W divisible by ``2 ** len(channels)``.
    classes : int
        Number of outputs.
    batch_norm : bool
        A batch norm over each convolution's channels (which then has no bias);
        without it, each convolution has a bias.
    channels : sequence of int
        Output channels of each convolution.
    seed : int
        Seed of the initial weights: the same with or without batch norm.
    dtype : {numpy.float32, numpy.float64}
        dtype of every parameter; feed inputs of this dtype.
    make_norm : callable, optional
        ``make_norm(num_features)`` returns the normalization layer (default
        ``nbbn.BatchNorm(num_features, dtype=dtype)``).
    init_scale : float
        Multiplies every initial weight (1: He init).

    Attributes
    ----------
    layers, norms : list
        As :class:`nbbn.programs.mlp.Network`.
    """

    def __init__(self, input_shape, classes, batch_norm=True, *, channels=(16, 32), seed=0,
                 dtype=np.float64, make_norm=None, init_scale=1.0):
        c, h, w = (int(s) for s in input_shape)
        scale = 2 ** len(channels)
        if h % scale or w % scale or min(c, h, w, classes, *channels) < 1:
            raise ValueError(f"expected positive sizes and H, W divisible by {scale}, got "
                             f"input_shape {tuple(input_shape)}, classes {classes}, "
                             f"channels {tuple(channels)}")
        dtype = _check_dtype(dtype)
        if make_norm is None:
            def make_norm(features):
                return BatchNorm(features, dtype=dtype)
        rng = np.random.default_rng(seed)
        self.dtype, self.batch_norm = dtype, bool(batch_norm)
        self.layers, self.norms = [], []
        for out in channels:
            self.layers.append(Conv2d(c, out, 3, 1, not self.batch_norm, rng, dtype, init_scale))
            if self.batch_norm:
                self._add_norm(make_norm(out))
            self.layers += [ReLU(), AvgPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.layers += [Flatten(), Linear(c * h * w, classes, True, rng, dtype, init_scale)]
