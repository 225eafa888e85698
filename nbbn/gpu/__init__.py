"""The GPU backend: ``numba.cuda`` kernels (``kernels``, ``channel_kernels``),
their launches (``backend``), the device memory they reuse (``memory``) and a
repair of numba's CUDA simulator (``simulator``).
Nothing here is imported by ``import nbbn``; it is loaded on the first device
array or ``device='cuda'``, or by ``import nbbn.gpu`` (which does not import
``numba.cuda`` until a function below is called)."""

__all__ = ["sync", "empty_cache"]


def sync() -> None:
    """Wait for the GPU, then warn (``RuntimeWarning``) about the training
    batches whose statistics were not finite since the device was last read,
    of every layer and of ``nbbn.functional``'s device running statistics
    (docs/gpu.md). Reading a layer's ``num_batches_tracked`` (or its
    ``state_dict()``, or moving it) does the same for that layer."""
    from .backend import sync as _sync
    _sync()


def empty_cache() -> None:
    """Free the device memory nbbn keeps to reuse (outputs no longer
    referenced, this thread's scratch); later calls allocate it again."""
    from .backend import empty_cache as _empty_cache
    _empty_cache()
