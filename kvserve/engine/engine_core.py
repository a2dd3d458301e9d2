"""The engine core: schedule, run the model, sample, finish requests. No strings: token ids in,
token ids out (detokenization and stop strings are the front end's, ``output_processor``).

Besides ``add_request``/``abort``/``step`` the core has named operations for the requests that
do not start from a prompt alone: a prefill whose blocks are held after it ends (``LLM.prefill``
and a prefill engine), blocks reserved for KV that arrives from elsewhere, and a request added
with its KV already in the cache and its first token (``LLM.decode`` and a decode engine).
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvserve.analysis.trace import StepTrace, split_tokens
from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler, SchedulerOutput
from kvserve.core.tenants import DEFAULT_TENANT
from kvserve.engine.messages import AddRequest, EngineOutput, Stats
from kvserve.engine.prompt_logprobs import PromptLogprobsBuffer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken
from kvserve.worker.kv_cache import PagedKVCache
from kvserve.worker.model_runner import ModelRunner, PendingOutput

logger = logging.getLogger("kvserve")


class StepFailed(RuntimeError):
    """A step raised inside the model; ``request_ids`` were in it and have been aborted."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


def validate_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError for sampling parameters that name tokens outside the vocabulary."""
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                         f"[0, {vocab_size})")


def validate_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError for a prompt that could never run (the front end and the core agree)."""
    if not prompt_token_ids:
        raise ValueError("prompt is empty: give at least one token or character")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(prompt_token_ids) + 1 > max_model_len:
        raise ValueError(
            f"prompt is {len(prompt_token_ids)} tokens, but max_model_len is "
            f"{max_model_len} and at least one token must be generated: shorten the "
            f"prompt to at most {max_model_len - 1} tokens"
        )


@dataclass
class _InFlight:
    """A launched step: what was scheduled, its pending tokens, and its trace fields."""

    scheduled: SchedulerOutput
    pending: PendingOutput
    started: float
    split: dict[str, tuple[int, int]] | None  # the step's (prefill, decode) tokens by tenant


class EngineCore:
    """One engine: a scheduler and a model runner, driven by ``step``."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        trace: StepTrace | None = None,
        async_scheduling: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = runner.model.config.vocab_size
        self.trace = trace  # --trace FILE: one JSON line per step and per finished request
        self._ids = itertools.count()
        self._capture_logits: set[str] = set()
        self.captured_logits: dict[str, list[torch.Tensor]] = {}
        self._first_token_times: dict[str, float] = {}
        self._held_first_tokens: dict[str, SampledToken] = {}  # of held requests, logprobs kept
        self._prompt_logprobs = PromptLogprobsBuffer()  # handed out with each first token
        self._queued: list[EngineOutput] = []  # outputs of named operations, sent with a step
        self.async_scheduling = async_scheduling
        self._in_flight: _InFlight | None = None  # launched, its tokens not read yet
        # structured requests whose grammar is still compiling: (request, its future)
        self._compiling: dict[str, tuple[Request, Future]] = {}

    # -- requests --------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt that could never run; allocates nothing."""
        validate_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)

    def new_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        return Request(
            request_id=request_id if request_id is not None else str(next(self._ids)),
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
            max_model_len=self.max_model_len,
            tenant=tenant or DEFAULT_TENANT,
            cache_salt=cache_salt or None,
        )

    def add(self, message: AddRequest) -> Request:
        """``add_request`` for a request that came as a message."""
        request = self.new_request(
            message.prompt_token_ids, message.params, message.request_id, message.arrival_time,
            message.tenant, message.cache_salt,
        )
        self.add_request(request)
        return request

    def add_request(self, request: Request, capture_logits: bool = False) -> None:
        """Queue ``request``; ValueError for a prompt that cannot run or an id in use."""
        self.validate_prompt(request.prompt_token_ids)
        validate_params(request.sampling_params, self.vocab_size)
        if request.request_id in self.scheduler.requests or request.request_id in self._compiling:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        structured = request.sampling_params.structured
        if structured is not None:
            if self.runner.grammars is None:
                raise ValueError("structured outputs need an engine with grammars")
            self.scheduler.check_fits(request.num_prompt_tokens)
        if capture_logits:  # keep the raw logits of every sampling step (tests, prefill export)
            self._capture_logits.add(request.request_id)
        if structured is not None and self.runner.grammars is not None:
            future = self.runner.grammars.compile(*structured)
            if not future.done():  # scheduled once compiled, off the step loop's thread
                self._compiling[request.request_id] = (request, future)
                return
            if future.exception() is not None:
                raise ValueError(f"structured: {future.exception()}")
        self.scheduler.add_request(request)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """End a request now and free its blocks; an unknown or finished id is ignored."""
        compiling = self._compiling.pop(request_id, None)
        if compiling is not None:
            compiling[0].finish(reason)
        request = self.scheduler.requests.get(request_id)
        self.scheduler.finish_request(request_id, reason)
        self.runner.drop_request(request_id)
        self._capture_logits.discard(request_id)
        self._prompt_logprobs.drop(request_id)
        if request is not None:
            self._trace_finished(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def has_work(self) -> bool:
        """Requests to step, a step to read, or outputs of named operations to hand out."""
        return (self.scheduler.has_unfinished or bool(self._queued)
                or self._in_flight is not None or bool(self._compiling))

    @property
    def only_compiling(self) -> bool:
        """Nothing to step but requests whose grammar is still compiling (the loop may wait)."""
        return bool(self._compiling) and not (
            self.scheduler.has_unfinished or self._queued or self._in_flight is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> Stats:
        return self.scheduler.stats()

    @property
    def kv_cache(self) -> PagedKVCache:
        """The paged KV tensors (for reading and writing a request's token range)."""
        return self.runner.kv_cache

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.config.max_num_seqs

    def abort_all(self) -> None:
        """Abort every request (shutdown)."""
        for request_id in list(self.scheduler.requests):
            self.abort(request_id)

    def reset_prefix_cache(self) -> None:
        """Forget cached blocks no request holds."""
        self.scheduler.kv.reset_prefix_cache()

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Run one scheduler step and return what each request gained.

        With asynchronous scheduling the step is scheduled and launched before the previous
        one's tokens are read, and what is returned is the previous step's: the device runs
        one step while the host schedules the next. A request that the previous step finished
        (EOS, max_tokens) may be in the step just launched: the token sampled for it there is
        dropped, and its blocks were freed when it finished.

        If the model fails, the step's requests are aborted (their blocks freed), cached blocks
        nobody holds are forgotten (this step may have registered blocks it never filled), and
        StepFailed names the requests; the engine stays usable for the others.
        """
        self._admit_compiled()
        outputs, self._queued = self._queued, []
        if self._in_flight is not None and not self._may_overlap():
            outputs += self._finish(self._pop_in_flight())
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        launched = None
        if not scheduled.is_empty:
            split = split_tokens(scheduled) if self.trace is not None else None
            try:
                pending = self.runner.launch(scheduled, frozenset(self._capture_logits))
            except Exception as error:
                if self._in_flight is not None:  # its tokens still reach their requests
                    self._queued = outputs + self._finish(self._pop_in_flight())
                    outputs = []
                raise self._fail(scheduled, error) from error
            launched = _InFlight(scheduled, pending, started, split)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._finish(previous)
        if not self.async_scheduling and self._in_flight is not None:
            outputs += self._finish(self._pop_in_flight())
        return outputs

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled before the one in flight has been read.
        Presence and frequency penalties need every generated id on the host, and a grammar
        its last token before it can mask the next, so while a request uses either the
        engine steps synchronously."""
        return self.async_scheduling and not any(
            r.sampling_params.uses_penalties or r.sampling_params.structured
            for r in self.scheduler.running)

    def _admit_compiled(self) -> None:
        """Hand the structured requests whose grammar is ready to the scheduler; one whose
        grammar failed to compile ends with finish reason ``abort`` (the front end checks
        grammars first, so that is an engine-side failure)."""
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is None:
                self.scheduler.add_request(request)
                continue
            logger.error("request %s: its grammar failed to compile: %s", request_id, error)
            request.finish("abort")
            self._queued.append(EngineOutput(request_id, [], "abort", None, 0, None))

    def _pop_in_flight(self) -> _InFlight:
        assert self._in_flight is not None
        step, self._in_flight = self._in_flight, None
        return step

    def _finish(self, step: _InFlight) -> list[EngineOutput]:
        """Wait for ``step``'s tokens and hand them to their requests."""
        try:
            result = step.pending.result()
        except Exception as error:
            raise self._fail(step.scheduled, error) from error
        for request_id, logits in result.logits.items():
            self.captured_logits.setdefault(request_id, []).append(logits)
        for request_id, part in result.prompt_logprobs.items():
            request = step.scheduled.requests.get(request_id)
            if request is not None and request is self.scheduler.requests.get(request_id):
                self._prompt_logprobs.add(request_id, part)  # not if it ended meanwhile
        updated = self.scheduler.update_from_output(
            step.scheduled, {rid: token.token_id for rid, token in result.sampled.items()}
        )
        outputs = [self._output(request, result.sampled[request.request_id])
                   for request in updated]
        if self.trace is not None and step.split is not None:
            self.trace.step(step.started, time.perf_counter(), step.split, self.stats())
        return outputs

    def _fail(self, scheduled: SchedulerOutput, error: BaseException) -> StepFailed:
        failed = [s.request_id for s in scheduled.scheduled]
        for request_id in failed:
            self.abort(request_id)
        self.reset_prefix_cache()
        return StepFailed(failed, error)

    def _output(self, request: Request, token: SampledToken) -> EngineOutput:
        """The output of a token already appended to ``request``."""
        self._first_token_times.setdefault(request.request_id, time.perf_counter())
        if request.hold_kv:
            self._held_first_tokens.setdefault(request.request_id, token)
        if request.is_finished:
            self._capture_logits.discard(request.request_id)
            self._trace_finished(request)
        prompt_logprobs = None
        if request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 1:
            prompt_logprobs = self._prompt_logprobs.pop(request.request_id,
                                                        request.num_prompt_tokens)
        return EngineOutput(
            request.request_id,
            [token],
            request.finish_reason,
            request.stop_reason,
            request.num_cached_tokens,
            request.first_scheduled_time,
            prompt_logprobs,
        )

    def _trace_finished(self, request: Request) -> None:
        first_token_time = self._first_token_times.pop(request.request_id, None)
        if self.trace is None:
            return
        self.trace.request(RequestOutput(
            request_id=request.request_id,
            prompt=None,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            finish_reason=request.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
            arrival_time=request.arrival_time,
            scheduled_time=request.first_scheduled_time,
            first_token_time=first_token_time,
            finished_time=time.perf_counter(),
        ), tenant=request.tenant if self.scheduler.config.tenants is not None else None)

    # -- named operations ------------------------------------------------------------------

    def prefill_and_hold(
        self, prompt_token_ids: list[int], params: SamplingParams, capture_logits: bool = False
    ) -> Request:
        """Add a request whose blocks stay allocated after it finishes, until
        ``release_held``: its KV can be read (``LLM.prefill``) or sent (a prefill engine)."""
        request = self.new_request(prompt_token_ids, params)
        request.hold_kv = True
        self.add_request(request, capture_logits)
        return request

    def release_held(self, request: Request) -> None:
        """Free the blocks of a held request (aborting it first if it still runs)."""
        if not request.is_finished:
            self.abort(request.request_id)
        self._held_first_tokens.pop(request.request_id, None)
        self.scheduler.release_held(request)

    def first_token_of_held(self, request: Request) -> SampledToken:
        """The first token a held request sampled, with its logprobs if it asked for them."""
        return self._held_first_tokens[request.request_id]

    def reserve(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """A request with blocks for its whole prompt, past what the prefix cache already has
        (``num_cached_tokens``), that the scheduler does not run: its KV is to be written by
        someone else (``write_kv``, a KV transport), then ``admit_with_kv`` continues it. No
        block is offered to the prefix cache before that. RuntimeError if the pool is full."""
        self.validate_prompt(prompt_token_ids)
        validate_params(params, self.vocab_size)
        if params.prompt_logprobs is not None:  # its prompt is never run through the model here
            raise ValueError("prompt_logprobs need the prompt prefilled by this engine, not KV "
                             "loaded from elsewhere")
        request = self.new_request(prompt_token_ids, params, request_id)
        if params.structured is not None and self.runner.grammars is not None:
            self.runner.grammars.compile(*params.structured)  # off the loop, while it prefills
        kv = self.scheduler.kv
        hit = kv.find_cached_prefix(request)
        num_tokens = len(prompt_token_ids)
        if not kv.allocate_slots(request, num_tokens - hit.num_tokens, hit, register=False):
            raise RuntimeError(
                f"no free KV blocks for a {num_tokens}-token prompt "
                f"({kv.num_free_blocks} of {kv.num_blocks} blocks free)"
            )
        kv.record_prefix_lookup(num_tokens, hit)
        request.num_cached_tokens = hit.num_tokens
        return request

    def cancel_reservation(self, request: Request) -> None:
        """Give a reservation's blocks back."""
        self.scheduler.kv.free(request)

    def admit_with_kv(self, request: Request, first_token: SampledToken) -> None:
        """Continue a reserved request whose whole prompt's KV is now in its blocks, from its
        first token (sampled elsewhere). Its blocks join the prefix cache now; the first
        token's output is handed out with the next ``step``."""
        request.num_computed_tokens = request.num_prompt_tokens
        self.scheduler.kv.register_computed_blocks(request)
        request.append_output_token(first_token.token_id)
        if request.is_finished:
            self.scheduler.kv.free(request)
        else:
            self.scheduler.add_request(request)
        self._queued.append(self._output(request, first_token))

    def block_table(self, request: Request) -> list[int]:
        return self.scheduler.kv.block_table(request.request_id)

    def sample_first(self, request: Request, logits: torch.Tensor) -> SampledToken:
        """Sample ``request``'s first token from prefill logits computed elsewhere."""
        params = request.sampling_params
        [token] = self.runner.sample(
            logits.unsqueeze(0),
            [(request.request_id, params, request.output_token_ids, request.num_output_tokens)],
        ).values()
        return token
