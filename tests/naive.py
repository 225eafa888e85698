"""Slow, obviously right float64 NumPy references for every nbbn path."""
import numpy as np


def reduce_axes(ndim, axis=1):
    """The axes statistics are taken over: every axis but the channel axis."""
    return tuple(i for i in range(ndim) if i != axis % ndim)


def per_channel(v, ndim, axis=1):
    """A (C,) vector shaped to broadcast against the input."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, axis=1):
    """Forward pass; returns (y, new_running_mean, new_running_var, mean, invstd)."""
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    if training:
        mean = x.mean(axis=axes)
        var = ((x - per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
        if running_mean is not None:
            running_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
            running_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * n / (n - 1)
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - per_channel(mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    if weight is not None:
        y = y * per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + per_channel(bias, x.ndim, axis)
    return y, running_mean, running_var, mean, invstd


def batch_norm_backward(dy, x, mean, invstd, weight=None, training=True, axis=1):
    """Gradients (dx, dweight, dbias) of :func:`batch_norm` for output gradient ``dy``."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    x_hat = (x - per_channel(mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    dbias = dy.sum(axis=axes)
    dweight = (dy * x_hat).sum(axis=axes)
    g = np.ones_like(invstd) if weight is None else np.asarray(weight, np.float64)
    dx_hat = dy * per_channel(g, x.ndim, axis)
    if training:
        dx_hat = dx_hat - (dx_hat.sum(axis=axes, keepdims=True)
                           + x_hat * (dx_hat * x_hat).sum(axis=axes, keepdims=True)) / n
    return dx_hat * per_channel(invstd, x.ndim, axis), dweight, dbias


def batch_renorm(x, moving_mean, moving_std, weight=None, bias=None, rmax=3.0, dmax=5.0,
                 momentum=0.01, eps=1e-5, axis=1):
    """Batch Renormalization in training, Algorithm 1 of Ioffe 2017 (arXiv:1702.03275).

    Returns (y, new_moving_mean, new_moving_std, mean_b, std_b, r, d); ``std`` is the
    moving sigma (not a variance) and ``std_b = sqrt(biased batch variance + eps)``.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, axis)
    mu, sigma = np.asarray(moving_mean, np.float64), np.asarray(moving_std, np.float64)
    mean_b = x.mean(axis=axes)
    std_b = np.sqrt(((x - per_channel(mean_b, x.ndim, axis)) ** 2).mean(axis=axes) + eps)
    r = np.clip(std_b / sigma, 1 / rmax, rmax)
    d = np.clip((mean_b - mu) / sigma, -dmax, dmax)
    x_hat = ((x - per_channel(mean_b, x.ndim, axis)) / per_channel(std_b, x.ndim, axis)
             * per_channel(r, x.ndim, axis) + per_channel(d, x.ndim, axis))
    y = x_hat
    if weight is not None:
        y = y * per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + per_channel(bias, x.ndim, axis)
    return (y, mu + momentum * (mean_b - mu), sigma + momentum * (std_b - sigma),
            mean_b, std_b, r, d)


def batch_renorm_backward(dy, x, mean_b, std_b, r, d, weight=None, axis=1):
    """Gradients (dx, dweight, dbias) of :func:`batch_renorm`, ``r`` and ``d`` held
    constant, written term by term as in the paper's Algorithm 1."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = reduce_axes(x.ndim, axis)
    m = x.size // x.shape[axis]
    xc = x - per_channel(mean_b, x.ndim, axis)
    s, rr = per_channel(std_b, x.ndim, axis), per_channel(r, x.ndim, axis)
    x_hat = xc / s * rr + per_channel(d, x.ndim, axis)
    g = np.ones_like(std_b) if weight is None else np.asarray(weight, np.float64)
    dx_hat = dy * per_channel(g, x.ndim, axis)
    d_std = (dx_hat * xc * (-rr / s ** 2)).sum(axis=axes, keepdims=True)
    d_mean = (dx_hat * (-rr / s)).sum(axis=axes, keepdims=True)
    dx = dx_hat * rr / s + d_std * xc / (m * s) + d_mean / m
    return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def ghost_batch_norm(x, running_mean, running_var, weight=None, bias=None, k=None,
                     momentum=0.1, eps=1e-5, axis=1):
    """Ghost batch normalization in training: :func:`batch_norm` on each group of ``k``
    consecutive samples along axis 0, the running statistics carried from group to
    group. Returns (y, running_mean, running_var, [(mean, invstd) per group])."""
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0] if k is None else k
    ys, stats = [], []
    for lo in range(0, x.shape[0], k):
        y, running_mean, running_var, mean, invstd = batch_norm(
            x[lo:lo + k], running_mean, running_var, weight, bias, True, momentum, eps, axis)
        ys.append(y)
        stats.append((mean, invstd))
    return np.concatenate(ys), running_mean, running_var, stats


def ghost_batch_norm_backward(dy, x, stats, weight=None, k=None, axis=1):
    """Gradients (dx, dweight, dbias) of :func:`ghost_batch_norm`, group by group."""
    k = len(x) if k is None else k
    parts = [batch_norm_backward(dy[g * k:(g + 1) * k], x[g * k:(g + 1) * k], mean, invstd,
                                 weight, True, axis)
             for g, (mean, invstd) in enumerate(stats)]
    return (np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts),
            sum(p[2] for p in parts))


def batch_norm_relu(x, *args, **kwargs):
    """``max(batch_norm(x), 0)``: :func:`batch_norm` with the output ReLU'd."""
    y, *rest = batch_norm(x, *args, **kwargs)
    return (np.maximum(y, 0.0), *rest)


def batch_norm_relu_backward(dy, x, mean, invstd, y, weight=None, training=True, axis=1):
    """Gradients of :func:`batch_norm_relu`: the ReLU passes ``dy`` where its
    output ``y`` is positive, then :func:`batch_norm_backward`."""
    g = np.where(np.asarray(y) > 0, np.asarray(dy, np.float64), 0.0)
    return batch_norm_backward(g, x, mean, invstd, weight, training, axis)


def numeric_gradient(f, a, h=1e-6):
    """Central differences of the scalar ``f()`` with respect to ``a``, perturbed in place."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return g
