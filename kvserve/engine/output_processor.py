"""Turns sampled token ids into text, logprobs and timings for each request."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvserve.core.request import Request
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput, TokenLogprob
from kvserve.worker.model_runner import SampledToken


@dataclass
class StreamDelta:
    """What one step added to one request: new text and token ids, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    output: RequestOutput  # the cumulative output so far
    finished: bool
    logprobs: list[TokenLogprob] | None = None  # of this delta's tokens, when asked for


class OutputProcessor:
    """Keeps each live request's cumulative RequestOutput and incremental detokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(self, request: Request, prompt: str | None) -> RequestOutput:
        output = RequestOutput(
            request_id=request.request_id,
            prompt=prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            logprobs=[] if request.sampling_params.logprobs is not None else None,
            arrival_time=request.arrival_time,
        )
        self._outputs[request.request_id] = output
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, stop=request.sampling_params.stop
        )
        return output

    def process_token(
        self, request: Request, token: SampledToken
    ) -> tuple[StreamDelta, str | None]:
        """Record one new token; returns the delta and the stop string it completed, if any."""
        now = time.perf_counter()
        output = self._outputs[request.request_id]
        detokenizer = self._detokenizers[request.request_id]
        output.token_ids.append(token.token_id)
        output.token_times.append(now)
        if output.first_token_time is None:
            output.first_token_time = now
            output.scheduled_time = request.first_scheduled_time
        output.num_cached_tokens = request.num_cached_tokens
        new_logprobs = None
        if output.logprobs is not None and token.logprob is not None:
            new_logprobs = [self._logprob(token)]
            output.logprobs.extend(new_logprobs)
        update = detokenizer.append(token.token_id)
        text = update.delta
        finished = request.is_finished or update.stop_string is not None
        if finished:
            if update.stop_string is None:
                text += detokenizer.finish()
            output.finish_reason = (
                "stop" if update.stop_string is not None else request.finish_reason
            )
            output.stop_reason = update.stop_string if update.stop_string else request.stop_reason
            output.finished_time = now
        output.text = detokenizer.text if finished else output.text + text
        delta = StreamDelta(
            request.request_id, text, [token.token_id], output, finished, new_logprobs
        )
        if finished:
            self._forget(request.request_id)
        return delta, update.stop_string

    def abort(self, request_id: str) -> RequestOutput | None:
        output = self._outputs.get(request_id)
        if output is not None:
            output.finish_reason = "abort"
            output.finished_time = time.perf_counter()
            self._forget(request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)
        self._detokenizers.pop(request_id, None)

    def _logprob(self, token: SampledToken) -> TokenLogprob:
        text_of = self.tokenizer.id_to_text
        return TokenLogprob(
            token_id=token.token_id,
            token=text_of(token.token_id),
            logprob=float(token.logprob) if token.logprob is not None else float("nan"),
            top_logprobs=[(tid, text_of(tid), lp) for tid, lp in token.top],
        )
