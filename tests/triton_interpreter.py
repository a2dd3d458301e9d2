"""Turn on Triton's CPU interpreter for the kernel tests on machines without a GPU.

Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array)``, which
NumPy >= 2.4 refuses for a one-element 1-D array; kernels that loop up to a loaded length
(``range(0, seq_len, BLOCK)``) then fail under the interpreter only. ``enable`` patches that
one conversion.
"""

from __future__ import annotations

import importlib.util
import os


def enable() -> None:
    """Set ``TRITON_INTERPRET=1`` (read when kernels are defined) and patch the scalar index."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
