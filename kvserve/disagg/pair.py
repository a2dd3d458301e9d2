"""A prefill engine and a decode engine in one process, joined by a KV transport.

For each request: the decode engine reserves blocks (its prefix cache decides what to skip),
the prefill engine computes the prompt and streams every layer's K/V as soon as that layer is
done, and the decode engine continues from the first token the prefill engine sampled. Both
engines are driven through the same typed operations (``PrefillOps``, ``DecodeOps``) a pair
of server processes uses, stepped here by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvserve.disagg.connector import KVLoader, KVSaver
from kvserve.disagg.core_ops import DecodeOps, PrefillOps
from kvserve.disagg.transport import InProcessTransport, KVTransport
from kvserve.engine.core_loop import CoreOps
from kvserve.engine.llm import LLM, Prompt
from kvserve.engine.messages import (
    AdmitWithKV,
    CallValue,
    CancelKV,
    CoreOp,
    PrefillAndSend,
    PrefilledKV,
    ReservedKV,
    ReserveKV,
)
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken

DECODE_RANK = 1  # the pair's one decode engine (the in-process transport ignores ranks)


class DisaggregatedPair:
    """``generate`` through a prefill engine and a decode engine (two ``LLM``s of one model)."""

    def __init__(self, prefill: LLM, saver: KVSaver, decode: LLM,
                 transport: KVTransport | None = None) -> None:
        """``prefill`` was built with ``saver`` as its KV connector (see ``build``)."""
        self.prefill, self.decode, self.saver = prefill, decode, saver
        self.loader = KVLoader(decode.engine.core)
        self.transport = transport or InProcessTransport(self.loader.deliver)
        self.prefill_ops = PrefillOps(prefill.engine.core, saver, lambda rank: self.transport)
        self.decode_ops = DecodeOps(decode.engine.core, self.loader)

    @classmethod
    def build(cls, model: str | None = None, **options: object) -> DisaggregatedPair:
        """Two engines of ``model`` with the same ``LLM`` options; the prefill one's runner
        gets a KV saver when it is built."""
        saver = KVSaver()
        prefill = LLM(model, kv_connector=saver, **options)
        return cls(prefill, saver, LLM(model, **options))

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Prefill each prompt and hand it over, then decode them all together."""
        params = params or SamplingParams()
        outputs = []
        engine = self.decode.engine
        for prompt in prompts:
            prompt_ids, text = self.prefill._tokenize(prompt)
            reserved = run_op(self.decode_ops, ReserveKV(prompt_ids, params))
            assert isinstance(reserved, ReservedKV)
            try:
                first = self._prefill_and_send(prompt_ids, params, reserved)
            except BaseException:
                run_op(self.decode_ops, CancelKV(reserved.transfer_id))
                raise
            output = engine.track(reserved.transfer_id, text, prompt_ids, params)
            run_op(self.decode_ops, AdmitWithKV(reserved.transfer_id, first), wait=_sleep)
            outputs.append(output)
        while engine.has_unfinished:
            engine.step()
        return outputs

    def _prefill_and_send(
        self, prompt_ids: list[int], params: SamplingParams, reserved: ReservedKV
    ) -> SampledToken:
        """The first token, once the prompt's KV has been computed and sent."""
        op = PrefillAndSend(prompt_ids, params, reserved.transfer_id, reserved.num_tokens,
                            reserved.skip_tokens, DECODE_RANK)
        done = run_op(self.prefill_ops, op, wait=self.prefill.engine.step)
        assert isinstance(done, PrefilledKV)
        return done.first_token

    def close(self) -> None:
        self.transport.close()


def _sleep() -> None:
    time.sleep(0.001)


def run_op(ops: CoreOps, op: CoreOp, wait: Callable[[], object] = _sleep) -> CallValue:
    """Submit ``op`` and call ``wait`` (step an engine) until it answers; its value, or a
    RuntimeError with its error."""
    ops.submit(0, op)
    while True:
        for result in ops.poll():
            if result.error is not None:
                raise RuntimeError(result.error)
            return result.value
        wait()
