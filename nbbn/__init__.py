"""nbbn: fast, exact batch normalization for NumPy, with Numba kernels."""
from . import _threads
from .batchnorm import BatchNorm
from .fold import fold_conv, fold_linear
from .functional import batch_norm
from .precise import precise_statistics
from .renorm import BatchRenorm
from .sync import SyncBatchNorm

__all__ = ["BatchNorm", "batch_norm", "BatchRenorm", "fold_linear", "fold_conv",
           "SyncBatchNorm", "precise_statistics"]
__version__ = "0.1.0"

_threads.load_tbb()  # before numba picks its threading layer (nbbn/_threads.py)
