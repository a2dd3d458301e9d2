"""The CPU decode step compiled with ``torch.compile`` (inductor's C++ backend).

An eager decode step of a small model is mostly per-op overhead: 30 layers of a dozen small
ops, each a dispatch, an allocation and a loop over a few hundred numbers. Compiled, the norms,
rotary, SiLU and residual adds become a few fused C++ loops per layer around the matmul kernels
(the quantized ones included), and attention runs in the graph (``graph_decode``).

Shapes: one graph for a single request, one for 2..``max_batch`` requests with the batch and
the block table's width as dynamic dimensions (so every context length uses it), and for a
quantized model a third from the batch size where its layers switch to their dense copy
(``QuantizedLinear.max_quantized_rows``: 8 with bf16). All are compiled at start, with
throwaway K/V writes into an empty pool; inductor's on-disk caches make a second start quick.
After that, guards are only evaluated as far as they tell the graphs apart
(``skip_guard_eval_unsafe``), and a recompilation is an error, never a silent stall.
"""

from __future__ import annotations

import itertools
import logging
import time
import types
from collections.abc import Callable

import torch

from kvserve.attention.graph_decode import GraphDecodeBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.model.llama import KVCaches, LlamaForCausalLM
from kvserve.model.quantize import QuantizedLinear
from kvserve.worker.decode_inputs import TokenFill, decode_inputs

logger = logging.getLogger("kvserve")

# Batches this large or smaller decode through a compiled graph (the CPU default max_num_seqs);
# larger ones run eagerly. Compiled, batch 32 of the embedded model went from 501 to 641
# tokens/s on the 2-core Xeon, batch 16 from 337 to 432.
COMPILED_MAX_BATCH = 64
# Tables are padded to at least this many blocks, so no warm-up or step has a width of 1
# (a dimension of size 1 would be specialised into a graph of its own).
MIN_TABLE_WIDTH = 2


class CompiledDecode:
    """A compiled decode forward for up to ``max_batch`` requests (CPU)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        block_size: int,
        max_batch: int = COMPILED_MAX_BATCH,
    ) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_batch = max_batch
        self._backend = GraphDecodeBackend()
        self._compiled = torch.compile(_own_code(self._forward), fullgraph=True, dynamic=False)
        self._ready = False

    def _forward(
        self,
        input_ids: torch.Tensor,  # [num_reqs]
        positions: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,  # [num_reqs, width]
    ) -> torch.Tensor:
        metadata = AttentionMetadata(
            query_start_loc=torch.arange(input_ids.shape[0] + 1),
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slots,
            query_lens_list=[],  # the graph backend reads tensors only
            seq_lens_list=[],
            block_size=self.block_size,
            generated_rows=torch.arange(input_ids.shape[0]),
        )
        return self.model(input_ids, positions, self.kv_caches, metadata, self._backend)

    @torch.inference_mode()
    def compile(self) -> None:
        """Compile both graphs. Call before any request exists: the warm-up steps write K/V
        into blocks 0 and 1, which only a request's own writes are ever read back from.
        Raises if dynamo ran a warm-up without compiling it (it falls back to eager then)."""
        start = time.perf_counter()
        sizes = self.warm_up_sizes()
        logger.info(
            "compiling the CPU decode step (%d graphs): up to a minute the first time, seconds "
            "once inductor's cache holds them; --enforce-eager skips it", len(sizes),
        )
        graphs_before = _graphs_compiled()
        for size in sizes:
            args = self._inputs([0] * size, [0] * size, [[0, 1]] * size)
            if size > 1:
                for tensor in args:
                    torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(args[-1], 1)  # the table's width: any context length
            self._compiled(*args)
        if _graphs_compiled() - graphs_before < len(sizes):
            raise RuntimeError("torch.compile fell back to eager for the decode step")
        self._ready = True
        logger.info(
            "compiled the CPU decode step for batches of up to %d (%d graphs) in %.1f s "
            "(--enforce-eager runs it eagerly)", self.max_batch, len(sizes),
            time.perf_counter() - start,
        )

    def warm_up_sizes(self) -> list[int]:
        """One batch size per graph: 1; 2 (dynamic from there); and, for a quantized model
        with a dense copy, the first size its layers send to the dense copy."""
        sizes = [1, 2] if self.max_batch >= 2 else [1]
        switch = _dense_switch(self.model)
        if switch is not None and 2 < switch <= self.max_batch:
            sizes.append(switch)
        return sizes

    def gives_logits(self, num_reqs: int) -> bool:
        """The compiled step ends at the final hidden states; the LM head runs after it."""
        return False

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        fill: TokenFill | None = None,
    ) -> torch.Tensor:
        """[num_reqs, hidden] final hidden states of one decode step."""
        if not self._ready:
            raise RuntimeError("CompiledDecode.run before compile()")
        if len(input_ids) > self.max_batch:
            raise ValueError(f"{len(input_ids)} decodes; this step takes at most {self.max_batch}")
        args = self._inputs(input_ids, positions, block_tables)
        if fill is not None:
            fill.apply(args[0])
        try:
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                return self._compiled(*args)
        except RuntimeError as error:
            if "recompil" not in str(error).lower():
                raise
            # A step the warm-up did not foresee. Dynamo refuses before running anything, so
            # no K/V was written: run this step eagerly and stop using the graphs, rather than
            # fail the step's requests or stall them all while a new graph compiles.
            logger.warning("the compiled CPU decode step would need recompiling, so decode "
                           "steps run eagerly from now on: %s", str(error)[:500])
            self.max_batch = 0
            return self._forward(*args)

    def _inputs(
        self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]
    ) -> tuple[torch.Tensor, ...]:
        inputs = decode_inputs(input_ids, positions, block_tables, self.block_size,
                               MIN_TABLE_WIDTH)
        return tuple(torch.from_numpy(array) for array in (
            inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens,
            inputs.block_tables,
        ))


_instances = itertools.count()


def _own_code(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``method`` rebuilt around a copy of its code object. Dynamo keeps compiled graphs, and
    its limit on recompilations (8), per code object: without the copy, every engine built in
    one process would share ``_forward``'s, and the fifth would find the limit reached and
    run eagerly (or, with recompilation forbidden, fail)."""
    assert isinstance(method, types.MethodType)
    func = method.__func__
    code = func.__code__.replace(co_name=f"{func.__name__}_{next(_instances)}")
    copy = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__,
                              func.__closure__)
    return types.MethodType(copy, method.__self__)


def _dense_switch(model: torch.nn.Module) -> int | None:
    """The batch size from which a quantized model's layers take their dense copy, or None."""
    rows = {m.max_quantized_rows for m in model.modules()
            if isinstance(m, QuantizedLinear) and m.dense is not None}
    return min(rows) + 1 if rows else None


def _graphs_compiled() -> int:
    """How many graphs dynamo has captured in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
