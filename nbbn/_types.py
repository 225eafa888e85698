"""The type aliases of nbbn's annotations (for editors and mypy: ``py.typed``)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, TypeAlias, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray


class DeviceArray(Protocol):
    """An array on the GPU: anything with ``__cuda_array_interface__`` (a Numba
    device array, a CuPy array, a CUDA torch tensor)."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...


#: What nbbn returns, and a layer's arrays: a NumPy array, or a device array on
#: the GPU (a Numba device array), depending on where the computation runs.
#: ``Any``, since no type describes both.
Array: TypeAlias = Any
#: An input: anything NumPy converts to a float16, bfloat16, float32 or float64
#: array, or a device array.
ArrayIn: TypeAlias = Union[ArrayLike, DeviceArray]
#: An array written in place (``out=``, running statistics): a NumPy float
#: array (float16, bfloat16, float32 or float64), or a device array.
ArrayOut: TypeAlias = Union[NDArray[np.floating], DeviceArray]
#: The channel axis: 1 for (N, C, ...) inputs, -1 for channels-last (..., C).
Axis: TypeAlias = Literal[1, -1]
#: A fused activation: None, or ``'relu'``.
Activation: TypeAlias = Optional[Literal["relu"]]
#: Where a layer computes (see :meth:`nbbn.BatchNorm.to`).
Device: TypeAlias = Literal["cpu", "cuda"]
#: An MPI communicator: an ``mpi4py.MPI.Comm``, or any object with its
#: ``Allgather``, ``Get_rank`` and ``Get_size``.
Comm: TypeAlias = Any
