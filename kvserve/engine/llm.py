"""The offline Python API: generate, stream, chat, and the two phases (prefill, decode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.builder import build_engine
from kvserve.engine.inprocess import InProcessEngine
from kvserve.engine.output_processor import StreamDelta
from kvserve.kv_connector import KVConnector
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass
class Prefilled:
    """The result of the prefill phase for one prompt.

    ``kv[layer] = (keys, values)``, each ``[num_prompt_tokens, num_kv_heads, head_dim]``: the
    request's layer-wise KV cache as plain tensors. ``logits`` is the raw float32 distribution
    of the first new token (``[vocab_size]``).
    """

    prompt: str | None
    prompt_token_ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)


class LLM:
    """An engine over the paged KV cache, driven from Python.

    ``LLM()`` loads the embedded SmolLM2-135M-Instruct; ``LLM("path/to/model.gguf")`` or an HF
    directory loads that. Keyword options are EngineConfig fields (dtype, kv_cache_memory, ...).
    """

    def __init__(
        self, model: str | None = None, *, kv_connector: KVConnector | None = None,
        **options: object,
    ) -> None:
        self.config = EngineConfig.from_options(model, options)
        self.engine = InProcessEngine(*build_engine(self.config, kv_connector))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order.

        Every prompt is tokenized and checked first, so a bad one fails before any work. They
        then enter the engine a window at a time (the waiting queue is kept at ``max_num_seqs``),
        so thousands of prompts stream through the scheduler instead of all being queued.
        """
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        tokenized = self._tokenize_all(prompt_list)
        outputs: list[RequestOutput] = []
        window = self.engine.core.max_num_seqs
        progress = tqdm(total=len(tokenized), disable=not use_tqdm, unit="req", desc="generate")
        generated = 0
        try:
            while True:
                while len(outputs) < len(tokenized) and self.engine.num_waiting < window:
                    (prompt_ids, text), p = tokenized[len(outputs)], param_list[len(outputs)]
                    request = self.engine.new_request(prompt_ids, p)
                    # the caller sees each output when it is done: decode its text then
                    outputs.append(self.engine.add_request(request, text, stream_text=False))
                if not self.engine.has_unfinished:
                    break
                for delta in self.engine.step():
                    generated += len(delta.token_ids)
                    if delta.finished:
                        progress.update(1)
                        elapsed = progress.format_dict["elapsed"]
                        if elapsed:
                            progress.set_postfix_str(f"{generated / elapsed:.1f} tok/s")
        finally:
            progress.close()
            for output in outputs:
                if not output.finished:
                    self.engine.abort(output.request_id)
        return outputs

    def get_stats(self) -> dict[str, int | float]:
        """Queue, KV pool and prefix-cache counters (see ``Scheduler.stats``)."""
        return self.engine.core.stats()

    def reset_prefix_cache(self) -> None:
        """Forget cached blocks no request holds (for benchmarks that compare cold runs)."""
        self.engine.core.reset_prefix_cache()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield one request's text as it is generated (aborted if the caller stops early)."""
        [output] = self._add_all([prompt], [params or SamplingParams()])
        try:
            while not output.finished:
                for delta in self.engine.step():
                    if delta.request_id == output.request_id:
                        yield delta
        finally:
            if not output.finished:
                self.engine.abort(output.request_id)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """Apply the model's chat template and generate the assistant's reply."""
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt_ids], params, use_tqdm=False)[0]

    def prefill(self, prompt: Prompt) -> Prefilled:
        """Phase one alone: compute the prompt's layer-wise KV and the first token's logits."""
        prompt_ids, text = self._tokenize(prompt)
        core = self.engine.core
        request = core.prefill_and_hold(
            prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), capture_logits=True
        )
        try:
            while not request.is_finished:
                core.step()
            table = core.block_table(request)
            cache = core.kv_cache
            num_tokens = len(prompt_ids)
            kv = [cache.read(layer, table, 0, num_tokens) for layer in range(len(cache.layers))]
        finally:
            core.release_held(request)
        [logits] = core.captured_logits.pop(request.request_id)
        return Prefilled(text, prompt_ids, kv, logits)

    def decode(self, prefilled: Prefilled, params: SamplingParams | None = None) -> RequestOutput:
        """Phase two alone: load a Prefilled's KV into the cache and generate from it."""
        params = params or SamplingParams()
        core = self.engine.core
        cache = core.kv_cache
        num_layers = len(cache.layers)
        expected = (len(prefilled.prompt_token_ids), *cache.layers[0][0].shape[2:])
        if len(prefilled.kv) != num_layers or any(
            tuple(k.shape) != expected or tuple(v.shape) != expected for k, v in prefilled.kv
        ):
            raise ValueError(f"prefilled KV must have {num_layers} layers of shape {expected}")
        request = core.reserve(prefilled.prompt_token_ids, params)
        try:
            table = core.block_table(request)
            start = request.num_cached_tokens  # blocks found in the prefix cache hold it already
            for layer, (keys, values) in enumerate(prefilled.kv):
                cache.write(layer, table, start, keys[start:], values[start:])
            first = core.sample_first(request, prefilled.logits)
        except BaseException:
            core.cancel_reservation(request)
            raise
        output = self.engine.track(
            request.request_id, prefilled.prompt, request.prompt_token_ids, params,
            request.arrival_time,
        )
        core.admit_with_kv(request, first)
        while not output.finished:
            self.engine.step()
        return output

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        return [int(t) for t in prompt], None

    def _tokenize_all(self, prompts: list[Prompt]) -> list[tuple[list[int], str | None]]:
        tokenized = [self._tokenize(p) for p in prompts]
        for index, (prompt_ids, _) in enumerate(tokenized):
            try:
                self.engine.validate_prompt(prompt_ids)
            except ValueError as error:
                if len(prompts) == 1:
                    raise
                raise ValueError(f"prompts[{index}]: {error}") from None
        return tokenized

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        """Validate every prompt first, so a bad one allocates nothing, then add them all."""
        tokenized = self._tokenize_all(prompts)
        outputs = []
        for (prompt_ids, text), p in zip(tokenized, params, strict=True):
            request = self.engine.new_request(prompt_ids, p)
            outputs.append(self.engine.add_request(request, text))
        return outputs


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str | list | tuple):
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids")
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _as_param_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
