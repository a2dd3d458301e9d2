"""A prefill engine and a decode engine in one process, joined by a KV transport.

For each request: the decode engine reserves blocks (its prefix cache decides what to skip),
the prefill engine computes the prompt and streams every layer's K/V as soon as that layer is
done, and the decode engine continues from the first token the prefill engine sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.disagg.connector import KVLoader, KVSaver, first_token_params
from kvserve.disagg.transfer import TransferPlan
from kvserve.disagg.transport import InProcessTransport, KVTransport
from kvserve.engine.llm import LLM, Prompt
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import SampledToken


class DisaggregatedPair:
    """``generate`` through a prefill engine and a decode engine (both ``LLM``s of one model)."""

    def __init__(self, prefill: LLM, decode: LLM, transport: KVTransport | None = None) -> None:
        self.prefill, self.decode = prefill, decode
        self.loader = KVLoader(decode.engine)
        self.transport = transport or InProcessTransport(self.loader.deliver)
        self.saver = KVSaver(self.transport, prefill.engine.runner.kv_cache)
        prefill.engine.runner.kv_saver = self.saver

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Prefill each prompt and hand it over, then decode them all together."""
        params = params or SamplingParams()
        outputs = []
        for prompt in prompts:
            prompt_ids, text = self.prefill._tokenize(prompt)
            plan = self.loader.reserve(prompt_ids, params, text)
            try:
                first = self._prefill_and_send(prompt_ids, params, plan)
            except BaseException:
                self.loader.cancel(plan.transfer_id)
                raise
            output, _ = self.loader.admit(plan.transfer_id, first)
            outputs.append(output)
        engine = self.decode.engine
        while engine.has_unfinished:
            engine.step()
        return outputs

    def _prefill_and_send(
        self, prompt_ids: list[int], params: SamplingParams, plan: TransferPlan
    ) -> SampledToken:
        engine = self.prefill.engine
        request = engine.new_request(prompt_ids, first_token_params(params))
        request.hold_kv = True  # blocks stay until every layer has been sent
        self.saver.add(request.request_id, plan)
        output = engine.add_request(request)
        try:
            while not request.is_finished:
                engine.step()
            self.transport.flush()
        finally:
            self.saver.drop(request.request_id)
            engine.scheduler.release_held(request)
        return SampledToken(output.token_ids[0])

    def close(self) -> None:
        self.transport.close()
        self.prefill.engine.runner.kv_saver = None
