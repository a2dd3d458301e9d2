"""The peer of `kvserve bench throughput`: Hugging Face transformers' ``generate``.

``generate`` runs static batches: every row of a batch runs until the batch's longest request
is done. To waste little, the requests are sorted by output length and cut into batches of
``batch_size``; each batch is left-padded (with an attention mask) and generates exactly the
batch's longest output length (``min_new_tokens == max_new_tokens``), greedy. Only each
request's own tokens are counted as output; the extra tokens of shorter rows are computed but
not counted, and are reported separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kvserve.benchmarks.report import TokenRates
from kvserve.benchmarks.workload import BenchRequest
from kvserve.model.source import resolve_model_source

WARMUP_PROMPT_TOKENS = 64


@dataclass
class HFResult(TokenRates):
    """One timed run of a workload through transformers' ``generate``."""

    num_requests: int
    batch_size: int
    num_batches: int
    prompt_tokens: int  # the requests' own prompt tokens
    output_tokens: int  # each request's own tokens: what is counted
    generated_tokens: int  # rows x new tokens of every batch, padding rows' extra included
    padded_prompt_tokens: int  # rows x longest prompt of every batch
    elapsed_s: float
    dtype: str
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # in request order

    def describe(self) -> str:
        return (
            f"generate, {self.dtype}, greedy; {self.num_batches} static batches of up to "
            f"{self.batch_size} requests sorted by output length, left-padded; each batch "
            "generates its longest output length and only each request's own tokens are "
            f"counted ({self.output_tokens:,} counted of {self.generated_tokens:,} generated; "
            f"{self.padded_prompt_tokens:,} prompt positions run for "
            f"{self.prompt_tokens:,} prompt tokens)"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["token_ids"]
        derived = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
        return {**data, **{name: getattr(self, name) for name in derived}}


def load_hf_model(model: str | None, load_format: str = "auto") -> torch.nn.Module:
    """transformers' float32 model from the same files kvserve loads (a GGUF is dequantized)."""
    if load_format == "dummy":
        raise ValueError(
            "--peer hf needs real weights, but --load-format is dummy: drop --load-format dummy "
            "(the default model is the embedded SmolLM2 GGUF) or pass a GGUF / HF directory"
        )
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    source = resolve_model_source(model)
    if source.kind == "gguf":
        loaded = AutoModelForCausalLM.from_pretrained(
            source.path.parent, gguf_file=source.path.name, dtype=torch.float32
        )
    else:
        loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    return loaded.eval()


def batches_by_output_len(requests: Sequence[BenchRequest], batch_size: int) -> list[list[int]]:
    """Request indices sorted by output length (stable), cut into batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: requests[i].output_len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_hf_generate(
    model: torch.nn.Module,
    requests: Sequence[BenchRequest],
    batch_size: int,
    log: Callable[[str], None] | None = None,
) -> HFResult:
    """Warm up, then time every batch's ``generate``; returns each request's own tokens."""
    pad_id = _pad_token_id(model)
    batches = batches_by_output_len(requests, batch_size)
    token_ids: list[list[int]] = [[] for _ in requests]
    generated = padded = 0
    with torch.inference_mode():
        warmup = BenchRequest(list(requests[0].prompt_token_ids[:WARMUP_PROMPT_TOKENS]), 2)
        _generate(model, [warmup], pad_id)
        start = time.perf_counter()
        for number, batch in enumerate(batches, 1):
            rows = _generate(model, [requests[i] for i in batch], pad_id)
            for index, row in zip(batch, rows, strict=True):
                token_ids[index] = row[: requests[index].output_len]
            longest_prompt = max(len(requests[i].prompt_token_ids) for i in batch)
            generated += len(batch) * len(rows[0])
            padded += len(batch) * longest_prompt
            if log is not None:
                log(f"transformers batch {number}/{len(batches)} done")
        elapsed = time.perf_counter() - start
    return HFResult(
        num_requests=len(requests),
        batch_size=batch_size,
        num_batches=len(batches),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(len(t) for t in token_ids),
        generated_tokens=generated,
        padded_prompt_tokens=padded,
        elapsed_s=elapsed,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        token_ids=token_ids,
    )


def _generate(model: torch.nn.Module, batch: list[BenchRequest], pad_id: int) -> list[list[int]]:
    """One left-padded greedy ``generate`` of exactly the batch's longest output length; the
    new tokens of every row."""
    longest = max(len(r.prompt_token_ids) for r in batch)
    new_tokens = max(r.output_len for r in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # [rows, longest]
    attention_mask = torch.zeros_like(input_ids)  # [rows, longest]: 1 on real tokens
    for row, request in enumerate(batch):
        length = len(request.prompt_token_ids)
        input_ids[row, longest - length :] = torch.tensor(request.prompt_token_ids)
        attention_mask[row, longest - length :] = 1
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
    )  # [rows, longest + new_tokens]
    return out[:, longest:].tolist()


def _pad_token_id(model: torch.nn.Module) -> int:
    """The model's pad id, else its (first) EOS id: padded positions are masked out anyway."""
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id, model.config.eos_token_id):
        if isinstance(candidate, list | tuple) and candidate:
            candidate = candidate[0]
        if isinstance(candidate, int):
            return candidate
    return 0
