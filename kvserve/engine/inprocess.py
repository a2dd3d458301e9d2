"""The engine core driven in this process, with the front end's output processing on top: what
the offline ``LLM`` uses. No thread and no socket: ``step`` runs the core's step and turns its
token ids into text right away, so offline batches pay no IPC. The server drives the same core
through ``AsyncEngine`` (in a thread, or in an engine process over ZeroMQ) with the same
OutputProcessor and the same messages.
"""

from __future__ import annotations

import time

import torch

from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.output_processor import OutputProcessor, StreamDelta
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import ModelRunner


class InProcessEngine:
    """An EngineCore and an OutputProcessor stepped together, synchronously."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.outputs = OutputProcessor(tokenizer)

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def captured_logits(self) -> dict[str, list[torch.Tensor]]:
        return self.core.captured_logits

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_work

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        self.core.validate_prompt(prompt_token_ids)

    def new_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        tenant: str | None = None, cache_salt: str | None = None,
    ) -> Request:
        return self.core.new_request(prompt_token_ids, params, request_id, tenant=tenant,
                                     cache_salt=cache_salt)

    def add_request(
        self, request: Request, prompt: str | None = None, capture_logits: bool = False,
        stream_text: bool = True,
    ) -> RequestOutput:
        """Queue ``request``; its RequestOutput fills in as the engine steps (its text as it
        goes, or at the end with ``stream_text=False``: see ``OutputProcessor.add_request``)."""
        output = self.track(request.request_id, prompt, request.prompt_token_ids,
                            request.sampling_params, request.arrival_time, stream_text)
        try:
            self.core.add_request(request, capture_logits)
        except BaseException:
            self.outputs.abort(request.request_id)
            raise
        return output

    def track(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        stream_text: bool = True,
    ) -> RequestOutput:
        """Follow a request the core has (or is about to have) in the output processor."""
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        return self.outputs.add_request(request_id, prompt, prompt_token_ids, params, arrival,
                                        stream_text)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        self.core.abort(request_id)
        self.outputs.abort(request_id)

    def step(self) -> list[StreamDelta]:
        """One core step; requests a stop string ended are finished in the core at once."""
        deltas, stopped = self.outputs.process(self.core.step())
        for request_id in stopped:
            self.core.abort(request_id, reason="stop")
        return deltas
