"""Prompt logprobs from a step's hidden states: for each prompt position ``q`` of a request
that asks for them, the log-probability of prompt token ``q + 1`` given the tokens up to ``q``
(the logits at ``q``), its rank, and the top N alternatives.

The scheduler names each grant's targets (``ScheduledRequest.prompt_logprob_targets``): the
prompt tokens its first positions predict, the last of which may be the next chunk's first
token, so a chunked prefill needs no state carried from one step to the next here. The hidden
states come from whichever forward ran the step (eager, prefill graphs, decode graphs): each
returns one row per scheduled token, and this reads them before the next step can overwrite a
graph's output buffer (the same stream, in order). Logits are computed ``ROWS_PER_SLICE`` rows
at a time, so a chunk of thousands of prompt tokens never holds more than that many
vocabulary-sized float32 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.core.scheduler import ScheduledRequest
from kvserve.device_copy import to_device
from kvserve.model.llama import LlamaForCausalLM
from kvserve.step_output import PromptLogprobs, SampledToken

ROWS_PER_SLICE = 256  # 256 x 49,152 x 4 bytes = 48 MiB of logits for the embedded model


@dataclass(frozen=True)
class _Span:
    """One request's rows in the step's prompt-logprob tensors."""

    request_id: str
    first_position: int  # of the prompt token its first row is about
    first_row: int
    num_rows: int
    num_top: int


@dataclass
class _Results:
    logprobs: torch.Tensor  # [num_rows] float32
    ranks: torch.Tensor  # [num_rows] int64
    top_logprobs: torch.Tensor  # [num_rows, max_top] float32
    top_token_ids: torch.Tensor  # [num_rows, max_top] int64


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host; ``result`` waits for them alone."""

    def __init__(self, spans: list[_Span], targets: list[int], results: _Results) -> None:
        self._spans = spans
        self._targets = targets
        self._event: torch.cuda.Event | None = None
        if results.logprobs.is_cuda:
            results = _Results(*(_to_pinned(t) for t in (
                results.logprobs, results.ranks, results.top_logprobs, results.top_token_ids)))
            self._event = torch.cuda.Event()
            self._event.record()
        self._results = results

    def result(self) -> dict[str, PromptLogprobs]:
        if self._event is not None:
            self._event.synchronize()
        logprobs = self._results.logprobs.tolist()
        ranks = self._results.ranks.tolist()
        top_lps = self._results.top_logprobs.tolist()
        top_ids = self._results.top_token_ids.tolist()
        out: dict[str, PromptLogprobs] = {}
        for span in self._spans:
            rows = range(span.first_row, span.first_row + span.num_rows)
            out[span.request_id] = PromptLogprobs(span.first_position, [
                SampledToken(self._targets[row], logprobs[row],
                             list(zip(top_ids[row][:span.num_top], top_lps[row][:span.num_top],
                                      strict=True)),
                             ranks[row])
                for row in rows
            ])
        return out


def launch_prompt_logprobs(
    model: LlamaForCausalLM, hidden: torch.Tensor, scheduled: list[ScheduledRequest]
) -> PendingPromptLogprobs | None:
    """Compute the prompt logprobs of this step's grants that name targets, from ``hidden``
    ([num_tokens, hidden_size], one row per scheduled token in order); None if none do."""
    spans: list[_Span] = []
    rows: list[int] = []
    targets: list[int] = []
    offset = 0
    for item in scheduled:
        wanted = item.prompt_logprob_targets
        num_top = item.sampling_params.prompt_logprobs
        if wanted and num_top is not None:
            spans.append(_Span(item.request_id, item.start_position + 1, len(targets),
                               len(wanted), num_top))
            rows.extend(range(offset, offset + len(wanted)))
            targets.extend(wanted)
        offset += len(item.token_ids)
    if not spans:
        return None
    index = to_device([rows, targets], torch.int64, hidden.device)  # [2, num_rows], one copy
    max_top = max(span.num_top for span in spans)
    parts = [_logprobs_of(model, hidden[index[0, start : start + ROWS_PER_SLICE]],
                          index[1, start : start + ROWS_PER_SLICE], max_top)
             for start in range(0, len(rows), ROWS_PER_SLICE)]
    results = _Results(*(torch.cat([getattr(p, name) for p in parts]) for name in
                         ("logprobs", "ranks", "top_logprobs", "top_token_ids")))
    return PendingPromptLogprobs(spans, targets, results)


def _logprobs_of(
    model: LlamaForCausalLM, hidden: torch.Tensor, targets: torch.Tensor, num_top: int
) -> _Results:
    """Log-softmax of the raw logits of ``hidden`` ([rows, hidden_size]) at ``targets``
    ([rows]), the targets' ranks (tokens at least as likely, itself included: ties rank last,
    as vLLM counts) and the ``num_top`` most likely tokens."""
    logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)  # [rows, vocab] float32
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [rows, 1]
    ranks = (logprobs >= chosen).sum(dim=1)  # [rows]
    top_logprobs, top_token_ids = logprobs.topk(num_top, dim=-1)  # [rows, num_top]
    return _Results(chosen.squeeze(1), ranks, top_logprobs, top_token_ids)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
