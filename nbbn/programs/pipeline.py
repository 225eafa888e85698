"""The pipeline case of ``python -m nbbn bench`` and asv: one training step of a
NumPy MLP, where BLAS matmuls run between the batch norm calls, as in a user's
training loop (a kernel that wins alone can lose there: thread pools compete).

``x (B, 256) @ W1 (256, 512) -> BatchNorm(512) -> ReLU -> @ W2 (512, 512) ->
BatchNorm(512) -> ReLU``, then the backward from a given output gradient: both
batch norm backwards and the three matmuls (``dW2``, the hidden gradient, ``dW1``).
Engines: nbbn (``BatchNorm(512, activation='relu')``), a plain NumPy batch norm
(mean, var, normalize; closed-form backward) and torch (the same model, autograd);
and ``matmuls``, the step's five NumPy matmuls alone, the floor under the two
NumPy steps (torch's step runs torch's own matmuls). float32 throughout.
"""
import numpy as np

__all__ = ["BATCHES", "STEPS", "make_step", "threading_report"]

#: Batch sizes of the default pipeline cases.
BATCHES = (64, 256, 1024)
IN, HIDDEN, EPS, MOMENTUM = 256, 512, 1e-5, 0.1


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, IN), dtype=np.float32)
    w1 = rng.standard_normal((IN, HIDDEN), dtype=np.float32) * np.float32(np.sqrt(2 / IN))
    w2 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * np.float32(np.sqrt(2 / HIDDEN))
    dy = rng.standard_normal((batch, HIDDEN), dtype=np.float32)
    return x, w1, w2, dy


class NbbnStep:
    """nbbn's layers with the fused ReLU, between NumPy matmuls."""

    def __init__(self, batch, threads=None):
        from .. import BatchNorm
        self.x, self.w1, self.w2, self.dy = _inputs(batch)
        self.bn1, self.bn2 = (BatchNorm(HIDDEN, EPS, MOMENTUM, activation="relu")
                              for _ in range(2))

    def __call__(self):
        a1 = self.bn1(self.x @ self.w1)
        self.bn2(a1 @ self.w2)
        g2 = self.bn2.backward(self.dy)
        dw2 = a1.T @ g2
        dw1 = self.x.T @ self.bn1.backward(g2 @ self.w2.T)
        return dw1, dw2


class NumpyStep:
    """The same step with a plain vectorized NumPy batch norm."""

    def __init__(self, batch, threads=None):
        self.x, self.w1, self.w2, self.dy = _inputs(batch)
        self.params = [[np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32),
                        np.zeros(HIDDEN, np.float32), np.ones(HIDDEN, np.float32)]
                       for _ in range(2)]

    @staticmethod
    def _forward(z, params):
        gamma, beta, running_mean, running_var = params
        n = z.shape[0]
        mean, var = z.mean(axis=0), z.var(axis=0)
        invstd = 1 / np.sqrt(var + EPS)
        x_hat = (z - mean) * invstd
        a = np.maximum(x_hat * gamma + beta, 0)
        running_mean *= 1 - MOMENTUM
        running_mean += MOMENTUM * mean
        running_var *= 1 - MOMENTUM
        running_var += MOMENTUM * n / (n - 1) * var
        return a, (x_hat, invstd, a)

    @staticmethod
    def _backward(dy, saved, gamma):
        x_hat, invstd, a = saved
        g = dy * (a > 0)
        n = g.shape[0]
        dbias, dweight = g.sum(axis=0), (g * x_hat).sum(axis=0)
        return (gamma * invstd / n) * (n * g - dbias - x_hat * dweight), dweight, dbias

    def __call__(self):
        a1, saved1 = self._forward(self.x @ self.w1, self.params[0])
        _, saved2 = self._forward(a1 @ self.w2, self.params[1])
        g2 = self._backward(self.dy, saved2, self.params[1][0])[0]
        dw2 = a1.T @ g2
        dw1 = self.x.T @ self._backward(g2 @ self.w2.T, saved1, self.params[0][0])[0]
        return dw1, dw2


class TorchStep:
    """The same model in torch: ``relu(batch_norm(x @ W))`` twice, autograd backward.
    Raises NotImplementedError without torch."""

    def __init__(self, batch, threads=None):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        x, w1, w2, dy = _inputs(batch)
        self.x, self.dy = torch.from_numpy(x), torch.from_numpy(dy)
        self.w = [torch.from_numpy(w).requires_grad_(True) for w in (w1, w2)]
        self.affine = [[torch.ones(HIDDEN, requires_grad=True),
                        torch.zeros(HIDDEN, requires_grad=True)] for _ in range(2)]
        self.running = [[torch.zeros(HIDDEN), torch.ones(HIDDEN)] for _ in range(2)]

    def __call__(self):
        f = self.torch.nn.functional
        a = self.x
        for w, (gamma, beta), (mean, var) in zip(self.w, self.affine, self.running):
            a = self.torch.relu(f.batch_norm(a @ w, mean, var, gamma, beta, True, MOMENTUM, EPS))
        for p in self.w + self.affine[0] + self.affine[1]:
            p.grad = None
        a.backward(self.dy)
        return self.w[0].grad.numpy(), self.w[1].grad.numpy()


class MatmulStep:
    """The step's five matmuls on the same shapes, with no batch norm and no
    ReLU: what the NumPy steps take whatever their batch norm costs."""

    def __init__(self, batch, threads=None):
        self.x, self.w1, self.w2, self.dy = _inputs(batch)

    def __call__(self):
        a1 = self.x @ self.w1
        a1 @ self.w2
        dw2 = a1.T @ self.dy
        dw1 = self.x.T @ (self.dy @ self.w2.T)
        return dw1, dw2


#: name -> step class, in the order tables show them.
STEPS = {"nbbn": NbbnStep, "numpy": NumpyStep, "torch": TorchStep, "matmuls": MatmulStep}
#: Steps without batch norm, which nbbn's is not compared with (no "vs" ratio).
FLOORS = ("matmuls",)


def make_step(engine, batch, threads=None):
    """The callable of one training step of ``engine`` at batch size ``batch``;
    each call returns ``(dW1, dW2)``."""
    return STEPS[engine](batch, threads)


def threading_report():
    """One line: numba's threading layer and the BLAS (and other thread pools)
    in use, as threadpoolctl sees them (after a parallel nbbn call)."""
    import numba
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"numba threading layer: {layer}; BLAS: unknown (pip install threadpoolctl)"
    pools = [f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('user_api')}, "
             f"{p.get('num_threads')} threads)".replace("  ", " ")
             for p in threadpool_info()]
    return f"numba threading layer: {layer}; thread pools: {'; '.join(pools) or 'none'}"
