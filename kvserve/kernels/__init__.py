"""Triton kernels for the GPU path: paged attention, K/V store and fused element-wise work;
and, in ``kvserve.kernels.cpu``, C++ ones for CPU decode (built on first use, no Triton).

Every kernel module imports Triton at its top, so import them only where they are asked for:
a model built with ``fused_ops=True`` or the ``triton`` attention backend. On a machine without
a GPU the same kernels run (slowly) under Triton's interpreter, which is how CI checks them
against the torch reference.
"""
