"""Forward (training, evaluation) and backward of one batch norm, per engine."""
from . import THREADS, pin_threads

#: The shapes of the issue's targets (N, C, ...), channels on axis 1.
SHAPES = [(64, 64, 112, 112), (32, 256, 28, 28), (4096, 1024), (8, 16, 32, 32), (256, 64)]
ENGINES = ["nbbn", "numpy", "torch", "torch-out"]
#: Half inputs run with float32 parameters (torch's mixed precision); bfloat16
#: needs ml_dtypes in the environment (``pip install "nbbn[bfloat16]"``).
DTYPES = ["float32", "float64", "float16", "bfloat16"]
OPERATIONS = ["forward-train", "forward-eval", "backward"]


class BatchNorm:
    """Seconds per call; ``setup`` builds the engine and runs the operation
    once, so that compiling (or loading) the kernels is never timed."""

    params = [ENGINES, SHAPES, DTYPES, OPERATIONS]
    param_names = ["engine", "shape", "dtype", "operation"]
    timeout = 600

    def setup(self, engine, shape, dtype, operation):
        from nbbn.programs.bench_engines import ENGINES as TABLE, dtype_named, make_inputs
        pin_threads()
        try:
            dt = dtype_named(dtype)
        except SystemExit as missing:  # bfloat16 without ml_dtypes: asv skips
            raise NotImplementedError(str(missing)) from None
        x, dy = make_inputs(shape, dt)
        # NotImplementedError (torch missing, or an operation the engine lacks): asv skips
        self.fn = TABLE[engine](x, dy, threads=THREADS).operation(operation)
        self.fn()

    def time_batch_norm(self, engine, shape, dtype, operation):
        self.fn()

    def teardown(self, engine, shape, dtype, operation):
        self.fn = None
