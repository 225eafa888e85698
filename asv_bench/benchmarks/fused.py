"""One training step (forward + backward) of batch norm followed by a ReLU:
nbbn's fused ``activation='relu'``, nbbn with a NumPy ReLU, torch's
``relu(batch_norm(x))`` with autograd."""
import numpy as np

from . import THREADS, pin_threads

SHAPES = [(64, 64, 112, 112), (32, 256, 28, 28), (8, 16, 32, 32)]
ENGINES = ["nbbn", "nbbn+numpy-relu", "torch"]


class FusedRelu:
    params = [ENGINES, SHAPES]
    param_names = ["engine", "shape"]
    timeout = 600

    def setup(self, engine, shape):
        from nbbn.programs.bench_engines import ENGINES as TABLE, make_inputs
        pin_threads()
        x, dy = make_inputs(shape, np.float32)
        self.fn = TABLE[engine](x, dy, threads=THREADS).operation("relu-step")
        self.fn()

    def time_relu_step(self, engine, shape):
        self.fn()

    def teardown(self, engine, shape):
        self.fn = None
