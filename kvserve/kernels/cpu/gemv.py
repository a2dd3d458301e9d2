"""kvserve's own int4 / int8 weight-only GEMV for CPU decode rows, a torch C++ op.

``torch.ops.kvserve.q4_gemm(x, packed, isa)`` and ``q8_gemm(x, packed, scales, isa)``
(``gemv.cpp`` says how they compute and how the weights are laid out). The source is compiled on
first use with the compiler torch's extensions use, into a cache folder named by a hash of the
source, the torch version and this CPU's ISA flags, so a binary is never loaded on a CPU it was
not built for (the AVX2 and AVX-512 code sit in one binary behind per-function target pragmas,
and the op checks the CPU again before it runs either).

``load_gemv()`` returns the ISA it picked and why, or None when the kernels cannot be used (no
compiler, not x86, no AVX2): then the caller keeps torch's kernels. The ops are built and
registered once per process, like any torch library.
``KVSERVE_CPU_GEMV_ISA`` forces a path: ``avx2``, ``avx512`` or ``off`` (tests, benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("kvserve")

SOURCE = Path(__file__).with_name("gemv.cpp")
ENV_ISA = "KVSERVE_CPU_GEMV_ISA"
ENV_CACHE = "KVSERVE_CACHE_DIR"
ISA_AVX2, ISA_AVX512 = 1, 2  # the op's ``isa`` argument (0 = the best this CPU has)
ISA_NAMES = {ISA_AVX2: "avx2", ISA_AVX512: "avx512"}
# The cpuinfo flags the kernels' paths depend on: part of the binary's cache key.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
             "avx512_vnni", "avx_vnni")
PAIR = 64  # inputs per pair of 32-blocks: K must be a multiple of it
BLOCK = 32
GROUP_ROWS = 4  # output rows per record: N must be a multiple of it
AVX2_INT4_MAX_ROWS, AVX512_INT4_MAX_ROWS = 8, 3  # see GemvKernels.int4_max_rows


@dataclass(frozen=True)
class GemvKernels:
    """The loaded ops and the ISA they run with on this CPU."""

    isa: int  # ISA_AVX2 or ISA_AVX512
    reason: str  # the CPU flags that chose it, for the start log
    int4_rows: int | None = None  # int4_max_rows instead of the ISA's (tests)

    @property
    def name(self) -> str:
        return ISA_NAMES[self.isa]

    @staticmethod
    def supports(in_features: int, out_features: int) -> bool:
        return in_features % PAIR == 0 and out_features % GROUP_ROWS == 0

    @property
    def int4_max_rows(self) -> int:
        """Above this many rows the int4 op hands over to torch's kernel.

        Against torch's kernel on the model's int4 linears (``bench/cpu_gemv.py``, 2 threads,
        an AMD EPYC family 26 with AVX-512 VNNI; docs/benchmarks.md): the AVX-512 path is
        1.29-1.57x at 1 row, 1.10-1.28x at 2, 1.02-1.09x at 3 and 0.91-1.06x at 4 (the Xeon of
        the first figures: 0.96-1.02x at 4). The AVX2 path runs only where torch's kernels run
        their AVX2 code too (``choose_isa``); against them (``ATEN_CPU_CAPABILITY=avx2`` on the
        same CPU) it is 2.1-3.1x at 1 row, 1.01-1.23x at 8, 1.05-1.21x at 16 and 0.99-1.20x at
        32, so it hands over above 8. An int4 layer keeps torch's format too and the op switches
        inside (a Python branch on the row count would split the compiled decode graphs). The
        int8 op (the LM head) is faster at every row count measured, 1 to 64, on both paths
        (1.06-2.04x AVX-512, 1.27-2.51x AVX2) and never hands over."""
        if self.int4_rows is not None:
            return self.int4_rows
        return AVX2_INT4_MAX_ROWS if self.isa == ISA_AVX2 else AVX512_INT4_MAX_ROWS

    def q4_gemm(self, x: torch.Tensor, packed: torch.Tensor,
                fallback: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[M, K] float -> [M, N] in x's dtype (``pack_int4``'s records); with ``fallback``
        (torch's packed weight and scales_and_zeros), rows above ``int4_max_rows`` use it."""
        if fallback is None:
            return torch.ops.kvserve.q4_gemm(x, packed, self.isa)
        return torch.ops.kvserve.q4_gemm(x, packed, self.isa, *fallback, self.int4_max_rows)

    def q8_gemm(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor
                ) -> torch.Tensor:
        """[M, K] float -> [M, N] in x's dtype (``pack_int8``'s records, float32 scales)."""
        return torch.ops.kvserve.q8_gemm(x, packed, scales, self.isa)


def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where it is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def choose_isa(flags: frozenset[str], forced: str | None, torch_isa: str = "AVX2"
               ) -> tuple[int | None, str]:
    """(the ISA to run, why); None when the kernels should not run here. ``torch_isa`` is
    the code torch's own kernels run (``torch.backends.cpu.get_cpu_capability()``): the AVX2
    path loses to torch's AVX-512 kernels from 2 rows (int4) and 4 rows (int8) on, so on a CPU
    with AVX-512 but no VNNI torch's kernels are kept."""
    has_avx2 = {"avx2", "fma", "f16c"} <= flags
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    if forced == "off":
        return None, f"{ENV_ISA}=off"
    if forced is not None:
        if forced not in ("avx2", "avx512"):
            raise ValueError(f"{ENV_ISA} must be avx2, avx512 or off, got {forced!r}")
        if not (has_avx512 if forced == "avx512" else has_avx2):
            raise ValueError(f"{ENV_ISA}={forced}, but this CPU's flags lack it")
        return (ISA_AVX512 if forced == "avx512" else ISA_AVX2), f"{ENV_ISA}={forced}"
    if has_avx512:
        return ISA_AVX512, "the CPU has avx512f/bw/vl and avx512_vnni (dpbusd)"
    if has_avx2 and torch_isa.upper().startswith("AVX512"):
        return None, "the CPU has AVX-512 without avx512_vnni, where torch's kernels are faster"
    if has_avx2:
        return ISA_AVX2, "the CPU has avx2/fma/f16c but no avx512_vnni (maddubs)"
    return None, "the CPU has no avx2/fma/f16c"


def build_directory(flags: frozenset[str]) -> Path:
    """Where the binary for this source, torch and CPU lives (created if missing)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(flags & set(ISA_FLAGS))).encode())
    root = Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "kvserve"))
    folder = root / "cpu_gemv" / key.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_gemv() -> GemvKernels | None:
    """The ops and the ISA for this CPU (``KVSERVE_CPU_GEMV_ISA`` is read on every call);
    None, with one warning, when they cannot run. The build happens once per process."""
    if platform.machine() not in ("x86_64", "AMD64"):
        logger.info("kvserve CPU GEMV off: %s is not x86-64", platform.machine())
        return None
    flags = cpu_flags()
    isa, why = choose_isa(flags, os.environ.get(ENV_ISA), torch.backends.cpu.get_cpu_capability())
    if isa is None:
        logger.info("kvserve CPU GEMV off: %s; torch's int4/int8 kernels run", why)
        return None
    if _compile_and_register() is not None:
        return None
    return GemvKernels(isa, why)


@functools.cache
def _compile_and_register() -> str | None:
    """Build and load the ops once per process; the error (logged once), or None. Once per
    process, not per source: a second binary would register the same op names again."""
    try:
        _build(build_directory(cpu_flags()))
    except Exception as error:  # no compiler, headers missing, ...: torch's kernels still work
        message = f"{type(error).__name__}: {error}"[:500]
        logger.warning("kvserve CPU GEMV kernels failed to build, torch's int4/int8 kernels run "
                       "instead: %s", message)
        return message
    return None


def _build(folder: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=f"kvserve_cpu_gemv_{folder.name}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-fno-strict-aliasing"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("kvserve::q4_gemm")
    def _(x: torch.Tensor, packed: torch.Tensor, isa: int = 0,
          fallback_packed: torch.Tensor | None = None,
          fallback_scales_and_zeros: torch.Tensor | None = None,
          fallback_above: int = 0) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0] * GROUP_ROWS)

    @torch.library.register_fake("kvserve::q8_gemm")
    def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, isa: int = 0
          ) -> torch.Tensor:
        return x.new_empty(x.shape[0], scales.shape[0])


@functools.cache
def pair_order() -> torch.Tensor:
    """[64] int64: the input (block * 32 + j) that position p of a pair holds (``gemv.cpp``)."""
    p = torch.arange(PAIR)
    return ((p // 4) % 2) * BLOCK + (p // 8) * 4 + p % 4


def to_pair_order(values: torch.Tensor) -> torch.Tensor:
    """[N, K] in input order -> [N, K] in pair order."""
    rows, columns = values.shape
    return values.reshape(rows, columns // PAIR, PAIR)[:, :, pair_order()].reshape(rows, columns)


def from_pair_order(values: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_pair_order``."""
    rows, columns = values.shape
    out = torch.empty_like(values).reshape(rows, columns // PAIR, PAIR)
    out[:, :, pair_order()] = values.reshape(rows, columns // PAIR, PAIR)
    return out.reshape(rows, columns)


def _group_rows(values: torch.Tensor, per_pair: int) -> torch.Tensor:
    """[N, pairs * per_pair] -> [N / 4, pairs * 4 * per_pair]: each pair's 4 rows together."""
    rows, columns = values.shape
    grouped = values.reshape(rows // GROUP_ROWS, GROUP_ROWS, columns // per_pair, per_pair)
    return grouped.transpose(1, 2).reshape(rows // GROUP_ROWS, GROUP_ROWS * columns)


def _ungroup_rows(values: torch.Tensor, per_pair: int) -> torch.Tensor:
    groups, columns = values.shape
    pairs = columns // (GROUP_ROWS * per_pair)
    grouped = values.reshape(groups, pairs, GROUP_ROWS, per_pair).transpose(1, 2)
    return grouped.reshape(groups * GROUP_ROWS, pairs * per_pair)


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 and per-32-block d, m [N, K / 32] (``w = d * q + m``) -> the op's
    records, uint8 [N / 4, 2.5 K] (``gemv.cpp``: d and m of the 4 rows, then the nibbles)."""
    rows, columns = q.shape
    ordered = to_pair_order(q.to(torch.uint8))
    pairs = ordered.reshape(rows, columns // PAIR, 2, PAIR // 2)  # [N, pairs, low/high, 32]
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(rows, columns // 2)
    header = [t.to(torch.float16).reshape(rows // GROUP_ROWS, -1).view(torch.uint8)
              for t in (scales, mins)]  # [N / 4, 4 * K / 32 * 2] each
    return torch.cat([*header, _group_rows(nibbles, PAIR // 2)], dim=1).contiguous()


def unpack_int4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_int4``: (q uint8 [N, K], d float16 [N, K / 32], m float16)."""
    groups, size = packed.shape
    columns = size * 2 // 5  # size = 2.5 K
    header = GROUP_ROWS * columns // BLOCK * 2
    d, m = (packed[:, i * header:(i + 1) * header].contiguous().view(torch.float16)
            .reshape(groups * GROUP_ROWS, columns // BLOCK) for i in (0, 1))
    nibbles = _ungroup_rows(packed[:, 2 * header:], PAIR // 2)
    pairs = nibbles.reshape(groups * GROUP_ROWS, columns // PAIR, 1, PAIR // 2)
    ordered = torch.cat([pairs & 0x0F, pairs >> 4], dim=2).reshape(groups * GROUP_ROWS, columns)
    return from_pair_order(ordered), d, m


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] in input order -> the op's records, int8 [N / 4, 4 K]."""
    return _group_rows(to_pair_order(q.to(torch.int8)), PAIR).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int8``: q int8 [N, K]."""
    return from_pair_order(_ungroup_rows(packed, PAIR))
