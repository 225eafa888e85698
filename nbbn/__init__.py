"""nbbn: fast, exact batch normalization for NumPy, with Numba kernels."""
from .batchnorm import BatchNorm
from .functional import batch_norm

__all__ = ["BatchNorm", "batch_norm"]
__version__ = "0.1.0"
