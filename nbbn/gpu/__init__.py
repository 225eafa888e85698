"""The GPU backend: ``numba.cuda`` kernels (``kernels``, ``channel_kernels``) and
their launches (``backend``). Nothing here is imported by ``import nbbn``; it
is loaded on the first device array or ``device='cuda'``."""
