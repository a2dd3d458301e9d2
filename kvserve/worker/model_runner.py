"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.core.request import PLACEHOLDER_TOKEN_ID
from kvserve.core.scheduler import ScheduledRequest, SchedulerOutput
from kvserve.device_copy import to_device
from kvserve.kv_connector import KVConnector
from kvserve.model.llama import LlamaForCausalLM
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import PromptLogprobs, SampledToken
from kvserve.worker.decode_inputs import DecodeStep, TokenFill
from kvserve.worker.grammar import Grammars
from kvserve.worker.kv_cache import PagedKVCache
from kvserve.worker.prefill_graphs import PrefillGraphs
from kvserve.worker.prompt_logprobs import PendingPromptLogprobs, launch_prompt_logprobs
from kvserve.worker.sampler import SamplerOutput, SamplingBatch, sample


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # only for captured requests
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


# One sampling row: (request_id, params, output token ids known, output tokens before this one)
SamplingRow = tuple[str, SamplingParams, list[int], int]


class PendingOutput:
    """A launched step's sampled tokens, on their way to the host: ``result`` waits for them.

    On a GPU the tokens are copied into pinned memory behind the step's kernels and an event
    marks the copy's end, so launching the step never waits for the device; only ``result``
    does, for this step alone.
    """

    def __init__(
        self,
        rows: list[SamplingRow],
        sampled: SamplerOutput | None,
        logits: dict[str, torch.Tensor],
        grammars: Grammars | None = None,
        prompt_logprobs: PendingPromptLogprobs | None = None,
    ) -> None:
        self.rows = rows
        self.logits = logits
        self._prompt_logprobs = prompt_logprobs  # of this step's prompt chunks, if asked for
        self._grammars = grammars  # advanced by each structured request's token
        self._event: torch.cuda.Event | None = None
        self._host = sampled
        if sampled is not None and sampled.token_ids.is_cuda:
            self._host = SamplerOutput(**{
                f.name: _to_pinned(getattr(sampled, f.name))
                for f in dataclasses.fields(sampled) if getattr(sampled, f.name) is not None
            })
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> ModelRunnerOutput:
        prompt = self._prompt_logprobs.result() if self._prompt_logprobs is not None else {}
        if self._host is None:
            return ModelRunnerOutput(prompt_logprobs=prompt)
        if self._event is not None:
            self._event.synchronize()
        sampled = _to_sampled_tokens(self._host, self.rows)
        if self._grammars is not None:
            for request_id, params, _, _ in self.rows:
                if params.structured:
                    self._grammars.accept(request_id, sampled[request_id].token_id)
            self._grammars = None  # once
        return ModelRunnerOutput(sampled, self.logits, prompt)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class ModelRunner:
    """Owns the model, the KV cache tensors and per-request sampling state (seeded generators).

    ``launch`` runs a step without reading its result back; the tokens it sampled stay on the
    device as well, for the next step's placeholder input ids (asynchronous scheduling).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: PagedKVCache,
        backend: AttentionBackend,
        eos_token_ids: frozenset[int],
        device: torch.device | str = "cpu",
        decode_step: DecodeStep | None = None,
        kv_connector: KVConnector | None = None,
        prefill_graphs: PrefillGraphs | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(device)
        self.decode_step = decode_step  # CUDA graphs (GPU) or a compiled step (CPU)
        self.kv_connector = kv_connector  # a prefill engine's KV saver (kvserve.disagg)
        self.prefill_graphs = prefill_graphs  # small steps that are not all decodes (GPU)
        self.grammars = grammars  # structured outputs: compiled grammars, one matcher a request
        self._generators: dict[str, torch.Generator] = {}
        # The last launched step's sampled token ids (device) and each request's row in them.
        self._last_token_ids: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    def execute(
        self, step: SchedulerOutput, capture_logits: frozenset[str] = frozenset()
    ) -> ModelRunnerOutput:
        """Run one step and wait for its tokens. Requests in ``capture_logits`` also get their
        raw logits returned."""
        return self.launch(step, capture_logits).result()

    @torch.inference_mode()
    def launch(
        self, step: SchedulerOutput, capture_logits: frozenset[str] = frozenset()
    ) -> PendingOutput:
        """Run one step up to its sampled tokens, without waiting for them on a GPU."""
        for request_id in step.finished_ids:
            self.drop_request(request_id)
        if step.is_empty:
            return PendingOutput([], None, {})
        hidden, gives_logits = self._forward(step.scheduled)
        # a decode graph that ran the LM head was not taken when a row wants prompt logprobs
        prompt = None if gives_logits else launch_prompt_logprobs(self.model, hidden,
                                                                  step.scheduled)
        sampling = [s for s in step.scheduled if s.sample]
        if not sampling:
            return PendingOutput([], None, {}, prompt_logprobs=prompt)
        ends = _query_ends(step.scheduled, sampling)
        if ends != list(range(len(hidden))):  # not every row samples: keep the ones that do
            hidden = hidden[to_device(ends, torch.int64, self.device)]
        # [num_sampling, vocab]
        logits = hidden if gives_logits else self.model.compute_logits(hidden)
        captured = {
            item.request_id: logits[row].clone()
            for row, item in enumerate(sampling) if item.request_id in capture_logits
        }
        rows = [(s.request_id, s.sampling_params, s.output_token_ids, s.num_generated)
                for s in sampling]
        grammar_rows = self._grammar_rows(sampling)
        sampled = self._sample(logits, rows, grammar_rows)
        self._last_token_ids = sampled.token_ids
        self._last_rows = {s.request_id: row for row, s in enumerate(sampling)}
        return PendingOutput(rows, sampled, captured,
                             self.grammars if grammar_rows[0] else None, prompt)

    def _grammar_rows(self, sampling: list[ScheduledRequest]) -> tuple[list[int], list[str]]:
        """The rows of a structured request, and their request ids (matchers started here)."""
        rows = [row for row, s in enumerate(sampling) if s.sampling_params.structured]
        if not rows:
            return [], []
        if self.grammars is None:
            raise RuntimeError("a structured request reached an engine without grammars")
        ids = [sampling[row].request_id for row in rows]
        for row, request_id in zip(rows, ids, strict=True):
            if not self.grammars.has(request_id):  # compiled before it was scheduled
                kind, spec = sampling[row].sampling_params.structured
                self.grammars.start(request_id, self.grammars.compile(kind, spec).result())
                for token_id in sampling[row].output_token_ids:  # sampled elsewhere (disagg)
                    self.grammars.accept(request_id, token_id)
        return rows, ids

    def _forward(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, bool]:
        """The step's final hidden states (one row per token), or, when the decode step ran
        the LM head too, its float32 logits: (tensor, whether it is logits)."""
        fill = self._token_fill(scheduled)
        connector = self.kv_connector
        if connector is not None and connector.begin_step(scheduled):
            try:
                return self._forward_eager(scheduled, fill,
                                           layer_hook=connector.save_layer), False
            finally:
                connector.end_step()
        fast = self.decode_step
        if (
            fast is not None
            and len(scheduled) <= fast.max_batch
            and all(len(s.token_ids) == 1 for s in scheduled)
        ):
            gives_logits = fast.gives_logits(len(scheduled))
            if not (gives_logits and any(s.prompt_logprob_targets for s in scheduled)):
                return fast.run(
                    [s.token_ids[0] for s in scheduled],
                    [s.start_position for s in scheduled],
                    [s.block_ids for s in scheduled],
                    fill,
                ), gives_logits
        small = self.prefill_graphs
        if small is not None and small.fits(sum(len(s.token_ids) for s in scheduled),
                                            len(scheduled)):
            return small.run(
                [s.token_ids for s in scheduled],
                [s.start_position for s in scheduled],
                [s.block_ids for s in scheduled],
                fill,
            ), False
        return self._forward_eager(scheduled, fill), False

    def _token_fill(self, scheduled: list[ScheduledRequest]) -> TokenFill | None:
        """Where this step's placeholder input ids are, and the device tokens that replace them:
        each is the last token of its request's grant, sampled by the step launched before."""
        rows: list[int] = []
        sources: list[int] = []
        row = 0
        for item in scheduled:
            row += len(item.token_ids)
            if item.token_ids[-1] != PLACEHOLDER_TOKEN_ID:
                continue
            source = self._last_rows.get(item.request_id)
            if source is None:
                raise RuntimeError(f"request {item.request_id!r} has a placeholder token but "
                                   "the step before sampled nothing for it")
            rows.append(row - 1)
            sources.append(source)
        if not rows or self._last_token_ids is None:
            return None
        if rows == sources == list(range(len(rows))):  # a steady decode batch: no index needed
            return TokenFill(None, self._last_token_ids[: len(rows)])
        index = to_device([rows, sources], torch.int64, self.device)  # one copy
        return TokenFill(index[0], self._last_token_ids[index[1]])

    def _forward_eager(
        self,
        scheduled: list[ScheduledRequest],
        fill: TokenFill | None = None,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        input_ids: list[int] = []
        positions: list[int] = []
        for item in scheduled:
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_position, item.start_position + len(item.token_ids)))
        metadata = build_attention_metadata(
            query_lens=[len(s.token_ids) for s in scheduled],
            seq_lens=[s.start_position + len(s.token_ids) for s in scheduled],
            block_tables=[s.block_ids for s in scheduled],
            block_size=self.kv_cache.block_size,
            device=self.device,
        )
        if self.model.quantized_lm_head is not None:  # quantized linears: prompt rows go dense
            rows = generated_rows(scheduled)
            metadata = dataclasses.replace(
                metadata, generated_rows=to_device(rows, torch.int64, self.device)
            )
        ids = to_device(input_ids, torch.int64, self.device)
        if fill is not None:
            fill.apply(ids)
        return self.model(
            ids,
            to_device(positions, torch.int64, self.device),
            self.kv_cache.layers,
            metadata,
            self.backend,
            layer_hook,
        )

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> dict[str, SampledToken]:
        """Sample one token per row of ``logits`` ([num_rows, vocab] float32) with each
        request's own generator and constraints, and read them back."""
        return _to_sampled_tokens(self._sample(logits, rows), rows)

    def _sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        grammar_rows: tuple[list[int], list[str]] = ([], []),
    ) -> SamplerOutput:
        indices, request_ids = grammar_rows
        batch = SamplingBatch(
            params=[params for _, params, _, _ in rows],
            output_token_ids=[output for _, _, output, _ in rows],
            generators=[self._generator(rid, params, n) for rid, params, _, n in rows],
            suppress_token_ids=[self._suppressed(params, n) for _, params, _, n in rows],
            grammar_rows=indices,
            token_bitmask=self.grammars.bitmask(request_ids) if request_ids else None,
        )
        return sample(logits, batch)

    def _generator(
        self, request_id: str, params: SamplingParams, num_generated: int
    ) -> torch.Generator | None:
        """A seeded request's generator. Each sampled token draws one value from it, so one
        made for a request that already has ``num_generated`` tokens (sampled by another
        engine, as a prefill engine samples the first) skips that many draws first."""
        if params.seed is None or params.greedy:
            return None
        if request_id not in self._generators:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            for _ in range(num_generated):
                torch.rand(1, generator=generator, device=generator.device)  # [1]
            self._generators[request_id] = generator
        return self._generators[request_id]

    def _suppressed(self, params: SamplingParams, num_generated: int) -> set[int] | None:
        if num_generated >= params.min_tokens:
            return None
        return set(self.eos_token_ids) | set(params.stop_token_ids)

    def drop_request(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.drop(request_id)


def generated_rows(scheduled: list[ScheduledRequest]) -> list[int]:
    """Rows of the flattened step whose positions are past their request's prompt."""
    rows: list[int] = []
    row = 0
    for item in scheduled:
        first = max(item.start_position, item.num_prompt_tokens)
        end = item.start_position + len(item.token_ids)
        rows.extend(range(row + first - item.start_position, row + len(item.token_ids)))
        row += end - item.start_position
    return rows


def _query_ends(scheduled: list[ScheduledRequest], sampling: list[ScheduledRequest]) -> list[int]:
    """Row index of the last token of each sampling request in the flattened batch."""
    ends: dict[str, int] = {}
    position = 0
    for item in scheduled:
        position += len(item.token_ids)
        ends[item.request_id] = position - 1
    return [ends[s.request_id] for s in sampling]


def _to_sampled_tokens(result: SamplerOutput, rows: list[SamplingRow]) -> dict[str, SampledToken]:
    token_ids = result.token_ids.tolist()
    logprobs = result.logprobs.tolist() if result.logprobs is not None else None
    top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
    top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    out: dict[str, SampledToken] = {}
    for row, (request_id, params, _, _) in enumerate(rows):
        token = SampledToken(token_ids[row])
        if params.logprobs is not None and logprobs is not None:
            token.logprob = logprobs[row]
            if top_ids is not None and top_lps is not None:
                k = params.logprobs
                token.top = list(zip(top_ids[row][:k], top_lps[row][:k], strict=True))
        out[request_id] = token
    return out
