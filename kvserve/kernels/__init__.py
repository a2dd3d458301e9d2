"""Triton kernels for the GPU path: paged attention, K/V store and fused element-wise work.

Every kernel module imports Triton at its top, so import them only after
``kvserve.kernels.availability.triton_enabled`` says yes. On a machine without a GPU the same
kernels run (slowly) under Triton's interpreter, which is how CI checks them against the torch
reference.
"""
