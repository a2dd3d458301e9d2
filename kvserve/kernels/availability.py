"""Whether Triton is installed, whether its CPU interpreter is on, and a launch-size helper.

Whether the kernels run is decided where a model or backend is built (``fused_ops=True``, the
``triton`` attention backend), never by a flag here. Tests run the kernels on CPU tensors under
Triton's interpreter: they set ``TRITON_INTERPRET=1`` before any kernel module is imported
(Triton reads it when a kernel is defined).
"""

from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """True when Triton runs kernels on the CPU, in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
