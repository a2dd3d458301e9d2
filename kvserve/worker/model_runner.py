"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.core.scheduler import ScheduledRequest, SchedulerOutput
from kvserve.kv_connector import KVConnector
from kvserve.model.llama import LlamaForCausalLM
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken
from kvserve.worker.decode_inputs import DecodeStep
from kvserve.worker.kv_cache import PagedKVCache
from kvserve.worker.sampler import SamplerOutput, SamplingBatch, sample


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # only for captured requests


class ModelRunner:
    """Owns the model, the KV cache tensors and per-request sampling state (seeded generators)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: PagedKVCache,
        backend: AttentionBackend,
        eos_token_ids: frozenset[int],
        device: torch.device | str = "cpu",
        decode_step: DecodeStep | None = None,
        kv_connector: KVConnector | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(device)
        self.decode_step = decode_step  # CUDA graphs (GPU) or a compiled step (CPU)
        self.kv_connector = kv_connector  # a prefill engine's KV saver (kvserve.disagg)
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(
        self, step: SchedulerOutput, capture_logits: frozenset[str] = frozenset()
    ) -> ModelRunnerOutput:
        """Run one step. Requests in ``capture_logits`` also get their raw logits returned."""
        for request_id in step.finished_ids:
            self._generators.pop(request_id, None)
        if step.is_empty:
            return ModelRunnerOutput()
        hidden = self._forward(step.scheduled)
        sampling = [s for s in step.scheduled if s.sample]
        if not sampling:
            return ModelRunnerOutput()
        ends = _query_ends(step.scheduled, sampling)
        if ends != list(range(len(hidden))):  # not every row samples: keep the ones that do
            hidden = hidden[torch.tensor(ends, device=self.device)]
        logits = self.model.compute_logits(hidden)  # [num_sampling, vocab]
        out = ModelRunnerOutput()
        for row, item in enumerate(sampling):
            if item.request_id in capture_logits:
                out.logits[item.request_id] = logits[row].clone()
        out.sampled = self.sample(
            logits, [(s.request_id, s.sampling_params, s.output_token_ids) for s in sampling]
        )
        return out

    def _forward(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        connector = self.kv_connector
        if connector is not None and connector.begin_step(scheduled):
            try:
                return self._forward_eager(scheduled, layer_hook=connector.save_layer)
            finally:
                connector.end_step()
        fast = self.decode_step
        if (
            fast is not None
            and len(scheduled) <= fast.max_batch
            and all(len(s.token_ids) == 1 for s in scheduled)
        ):
            return fast.run(
                [s.token_ids[0] for s in scheduled],
                [s.start_position for s in scheduled],
                [s.block_ids for s in scheduled],
            )
        return self._forward_eager(scheduled)

    def _forward_eager(
        self,
        scheduled: list[ScheduledRequest],
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
                metadata, generated_rows=torch.tensor(rows, dtype=torch.int64, device=self.device)
            )
        return self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
            self.kv_cache.layers,
            metadata,
            self.backend,
            layer_hook,
        )

    def sample(
        self,
        logits: torch.Tensor,  # [num_rows, vocab] float32
        rows: list[tuple[str, SamplingParams, list[int]]],  # (request_id, params, output ids)
    ) -> dict[str, SampledToken]:
        """Sample one token per row with each request's own generator and constraints."""
        batch = SamplingBatch(
            params=[params for _, params, _ in rows],
            output_token_ids=[output for _, _, output in rows],
            generators=[self._generator(rid, params) for rid, params, _ in rows],
            suppress_token_ids=[self._suppressed(params, output) for _, params, output in rows],
        )
        result = sample(logits, batch)
        return _to_sampled_tokens(result, rows)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        if request_id not in self._generators:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            self._generators[request_id] = generator
        return self._generators[request_id]

    def _suppressed(self, params: SamplingParams, output: list[int]) -> set[int] | None:
        if len(output) >= params.min_tokens:
            return None
        return set(self.eos_token_ids) | set(params.stop_token_ids)

    def drop_request(self, request_id: str) -> None:
        self._generators.pop(request_id, None)


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


def _to_sampled_tokens(
    result: SamplerOutput, rows: list[tuple[str, SamplingParams, list[int]]]
) -> dict[str, SampledToken]:
    token_ids = result.token_ids.tolist()
    logprobs = result.logprobs.tolist() if result.logprobs is not None else None
    top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
    top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    out: dict[str, SampledToken] = {}
    for row, (request_id, params, _) in enumerate(rows):
        token = SampledToken(token_ids[row])
        if params.logprobs is not None and logprobs is not None:
            token.logprob = logprobs[row]
            if top_ids is not None and top_lps is not None:
                k = params.logprobs
                token.top = list(zip(top_ids[row][:k], top_lps[row][:k], strict=True))
        out[request_id] = token
    return out
