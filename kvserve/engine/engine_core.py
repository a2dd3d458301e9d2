"""The step loop: schedule, run the model, sample, detokenize, finish requests."""

from __future__ import annotations

import itertools
import time

import torch

from kvserve.analysis.trace import StepTrace, split_tokens
from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler
from kvserve.engine.output_processor import OutputProcessor, StreamDelta
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import ModelRunner, SampledToken


class StepFailed(RuntimeError):
    """A step raised inside the model; ``request_ids`` were in it and have been aborted."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


class EngineCore:
    """One engine: a scheduler, a model runner and an output processor, driven by ``step``."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_model_len: int,
        trace: StepTrace | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.trace = trace  # --trace FILE: one JSON line per step and per finished request
        self.outputs = OutputProcessor(tokenizer)
        self._ids = itertools.count()
        self._capture_logits: set[str] = set()
        self.captured_logits: dict[str, list[torch.Tensor]] = {}

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt that could never run; allocates nothing."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token or character")
        vocab = self.runner.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_token_ids)} tokens, but max_model_len is "
                f"{self.max_model_len} and at least one token must be generated: shorten the "
                f"prompt to at most {self.max_model_len - 1} tokens"
            )

    def new_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        return Request(
            request_id=request_id if request_id is not None else str(next(self._ids)),
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            arrival_time=time.perf_counter(),
            max_model_len=self.max_model_len,
        )

    def add_request(
        self, request: Request, prompt: str | None = None, capture_logits: bool = False
    ) -> RequestOutput:
        self.validate_prompt(request.prompt_token_ids)
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        output = self.outputs.add_request(request, prompt)
        if capture_logits:  # keep the raw logits of every sampling step (tests, prefill export)
            self._capture_logits.add(request.request_id)
        self.scheduler.add_request(request)
        return output

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        self.scheduler.finish_request(request_id, "abort")
        self.outputs.abort(request_id)
        self.runner.drop_request(request_id)
        self._capture_logits.discard(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[StreamDelta]:
        """Run one scheduler step and return what each request gained.

        If the model fails, the step's requests are aborted (their blocks freed), cached blocks
        nobody holds are forgotten (this step may have registered blocks it never filled), and
        StepFailed names the requests; the engine stays usable for the others.
        """
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if self.trace is not None:
            prefill, decode = split_tokens(scheduled, self.scheduler)
        try:
            result = self.runner.execute(scheduled, frozenset(self._capture_logits))
        except Exception as error:
            failed = [s.request_id for s in scheduled.scheduled]
            for request_id in failed:
                self.abort(request_id)
            self.scheduler.kv.reset_prefix_cache()
            raise StepFailed(failed, error) from error
        for request_id, logits in result.logits.items():
            self.captured_logits.setdefault(request_id, []).append(logits)
        requests = {
            s.request_id: self.scheduler.requests.get(s.request_id) for s in scheduled.scheduled
        }
        self.scheduler.update_from_output(
            scheduled, {rid: token.token_id for rid, token in result.sampled.items()}
        )
        deltas = []
        for request_id, token in result.sampled.items():
            request = requests[request_id]
            if request is not None:
                deltas.append(self.emit_token(request, token))
                if request.is_finished:
                    self._capture_logits.discard(request_id)
        if self.trace is not None and not scheduled.is_empty:
            self.trace.step(started, time.perf_counter(), prefill, decode,
                            self.scheduler.stats())
            for delta in deltas:
                if delta.finished:
                    self.trace.request(delta.output)
        return deltas

    def emit_token(self, request: Request, token: SampledToken) -> StreamDelta:
        """Detokenize a token already appended to ``request``; end it on a stop string."""
        delta, stop_string = self.outputs.process_token(request, token)
        if stop_string is not None:
            self.scheduler.finish_request(request.request_id, "stop", stop_string)
        return delta
