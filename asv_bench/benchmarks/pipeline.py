"""One training step of a NumPy MLP whose batch norms run between BLAS matmuls
(``nbbn.programs.pipeline``): nbbn, a plain NumPy batch norm, torch, and the
NumPy matmuls alone (no batch norm: the floor of the NumPy steps), at the
batch sizes of ``python -m nbbn bench``'s pipeline case. asv times each
benchmark in processes of its own, as the bench does."""
from . import THREADS, pin_threads


class Pipeline:
    params = [["nbbn", "numpy", "torch", "matmuls"], [64, 256, 1024]]
    param_names = ["engine", "batch"]
    timeout = 300

    def setup(self, engine, batch):
        from nbbn.programs.pipeline import make_step
        pin_threads()
        # NotImplementedError (torch missing): asv skips the parameter
        self.step = make_step(engine, batch, threads=THREADS)
        self.step()

    def time_mlp_step(self, engine, batch):
        self.step()

    def teardown(self, engine, batch):
        self.step = None
