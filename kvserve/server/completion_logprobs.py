"""What ``/v1/completions`` returns about tokens: OpenAI's legacy ``logprobs`` (parallel lists),
with ``echo`` the prompt's tokens first; vLLM's ``prompt_logprobs`` extension; and the echoed
prompt text.

With ``echo``, the first prompt token has no logprob (nothing comes before it): its
``token_logprobs`` and ``top_logprobs`` entries are null, as OpenAI returns. ``text_offset`` is
each token's character offset in the choice's text, the echoed prompt included: the summed
lengths of the tokens before it (as vLLM counts; equal to the offset in the text wherever the
tokens decode one by one to the text, which a character split over two tokens breaks).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import TokenLogprob
from kvserve.server.protocol import CompletionLogprobs, CompletionRequest, PromptLogprob
from kvserve.server.serving import PromptInput, clamp_logprob


@dataclass(frozen=True)
class LogprobItem:
    """One token of the legacy lists; ``logprob`` and ``top`` are None for the first prompt
    token."""

    token: str
    logprob: float | None
    top: dict[str, float] | None


def engine_prompt_logprobs(body: CompletionRequest) -> int | None:
    """How many alternatives per prompt token the engine computes: vLLM's ``prompt_logprobs``,
    and with ``echo`` the ``logprobs`` asked for (the prompt's tokens are listed too)."""
    asked = [body.prompt_logprobs]
    if body.echo:
        asked.append(body.logprobs)
    numbers = [n for n in asked if n is not None]
    return max(numbers) if numbers else None


def echo_text(tokenizer: Tokenizer, prompt: PromptInput) -> str:
    """The prompt as sent, or a token-id prompt decoded (special tokens kept, so the text
    matches the tokens listed in ``logprobs``)."""
    if prompt.text is not None:
        return prompt.text
    return tokenizer.decode(prompt.token_ids, skip_special_tokens=False)


def prompt_items(
    tokenizer: Tokenizer, prompt_token_ids: list[int],
    prompt_logprobs: list[TokenLogprob | None] | None, num_top: int,
) -> list[LogprobItem]:
    """The legacy items of the prompt's tokens (from the engine's prompt logprobs)."""
    entries = prompt_logprobs or []
    if len(entries) != len(prompt_token_ids):
        raise RuntimeError(f"the engine returned prompt logprobs for {len(entries)} of "
                           f"{len(prompt_token_ids)} prompt tokens")
    items = [LogprobItem(tokenizer.id_to_text(prompt_token_ids[0]), None, None)]
    for entry in entries[1:]:
        assert entry is not None  # only the first entry is None
        items.append(_item(entry, num_top))
    return items


def completion_items(logprobs: list[TokenLogprob] | None) -> list[LogprobItem]:
    return [_item(entry, len(entry.top_logprobs)) for entry in logprobs or []]


def _item(entry: TokenLogprob, num_top: int) -> LogprobItem:
    top = {text: clamp_logprob(lp) for _, text, lp in entry.top_logprobs[:num_top]}
    return LogprobItem(entry.token, clamp_logprob(entry.logprob), top)


def legacy_logprobs(items: list[LogprobItem], text_offset: int) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists of tokens, their logprobs, the top alternatives
    ({token: logprob}) and each token's character offset, the first at ``text_offset``."""
    offsets = []
    for item in items:
        offsets.append(text_offset)
        text_offset += len(item.token)
    return CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[item.top for item in items],
        text_offset=offsets,
    )


def vllm_prompt_logprobs(
    prompt_logprobs: list[TokenLogprob | None] | None, num_top: int
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's ``choices[i].prompt_logprobs``: None for the first prompt token, then for each
    token ``{token_id: {logprob, rank, decoded_token}}`` of the token itself (its rank in the
    vocabulary) and the ``num_top`` most likely (ranks 1..num_top)."""
    out: list[dict[int, PromptLogprob] | None] = []
    for entry in prompt_logprobs or []:
        if entry is None:
            out.append(None)
            continue
        ranked = {entry.token_id: PromptLogprob(  # the token itself first, as vLLM lists it
            logprob=clamp_logprob(entry.logprob), rank=entry.rank, decoded_token=entry.token)}
        for rank, (token_id, text, lp) in enumerate(entry.top_logprobs[:num_top], 1):
            ranked[token_id] = PromptLogprob(logprob=clamp_logprob(lp), rank=rank,
                                             decoded_token=text)
        out.append(ranked)
    return out
