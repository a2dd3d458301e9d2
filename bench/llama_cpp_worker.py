"""Measure llama.cpp (through llama-cpp-python) for bench/cpu_latency.py; prints JSON.

Run by cpu_latency.py with the peer's own interpreter, so it imports only llama_cpp, numpy (a
dependency of llama_cpp) and the standard library. It reads one JSON spec on stdin::

    {"model": path, "n_threads": 2, "n_ctx": 2048,
     "new_tokens": 128, "batch_new_tokens": 64, "warmup_new_tokens": 16,
     "ttft_prompts": {"128": [[ids], ...], ...},      # first prompt of each list is the warm-up
     "decode_prompts": [[ids], ...],                  # batch 1, first is the warm-up
     "batch_prompts": [[[ids] x 8], ...]}             # batch 8, first batch is the warm-up

and prints {"version", "ttft_s": {length: [seconds per timed run]}, "decode_b1": [runs],
"decode_batch": [runs] or {"na": reason}}, where every decode run is {"first": [t], "last": [t],
"tokens": [n]} per sequence (perf_counter seconds), as cpu_latency.decode_rate expects.

Time to first token and batch-1 decode use the high-level ``Llama.generate`` (greedy), with
``reset()`` before each run so no KV cache is reused. Batch 8 uses the low-level batch API
(``llama_batch``, one sequence id per prompt, greedy argmax over each row's logits), as
llama.cpp's own ``batched`` example does; the high-level binding decodes one sequence only.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp
import numpy as np


def time_to_first_token(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    """Seconds from calling generate to the first sampled token, on an empty KV cache."""
    llm.reset()
    start = time.perf_counter()
    for _ in llm.generate(prompt, temp=0.0):
        return time.perf_counter() - start
    raise RuntimeError("llama.cpp generated no token")


def decode_one(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> dict:
    """Greedy-decode exactly ``new_tokens`` tokens (EOS is not checked); token timestamps."""
    llm.reset()
    times = []
    for _ in llm.generate(prompt, temp=0.0):
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    return {"first": [times[0]], "last": [times[-1]], "tokens": [len(times)]}


class BatchDecoder:
    """Greedy decoding of several sequences together through llama.cpp's llama_batch API."""

    def __init__(self, model_path: str, n_threads: int, n_ctx: int, n_seq: int) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            model_path.encode(), llama_cpp.llama_model_default_params()
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, n_seq)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (token, position, seq_id, wants_logits) entries; argmax of each wanted row."""
        batch = self.batch
        for i, (token, pos, seq_id, wants_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = wants_logits
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        num_rows = sum(entry[3] for entry in entries)
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits(self.ctx), shape=(num_rows, self.n_vocab)
        )  # [num_rows, n_vocab], the rows that asked for logits, in batch order
        return logits.argmax(axis=1).tolist()

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """Prefill every prompt in one batch, then decode all sequences one token per step."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        entries = [
            (token, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(prompts)
            for pos, token in enumerate(prompt)
        ]
        tokens = self._decode(entries)
        first = time.perf_counter()
        for step in range(1, new_tokens):
            tokens = self._decode(
                [(token, len(prompt) + step - 1, seq, True)
                 for seq, (prompt, token) in enumerate(zip(prompts, tokens, strict=True))]
            )
        last = time.perf_counter()
        n = len(prompts)
        return {"first": [first] * n, "last": [last] * n, "tokens": [new_tokens] * n}

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def measure(spec: dict) -> dict:
    """Every measurement in the spec; the first prompt of each list is an untimed warm-up."""
    llm = llama_cpp.Llama(
        spec["model"], n_threads=spec["n_threads"], n_threads_batch=spec["n_threads"],
        n_ctx=spec["n_ctx"], verbose=False,
    )
    ttft = {
        length: [time_to_first_token(llm, p) for p in prompts][1:]
        for length, prompts in spec["ttft_prompts"].items()
    }
    def new_tokens(key: str, run: int) -> int:
        return spec[key] if run else spec["warmup_new_tokens"]

    decode_b1 = [
        decode_one(llm, p, new_tokens("new_tokens", i))
        for i, p in enumerate(spec["decode_prompts"])
    ][1:]
    del llm
    batches = spec["batch_prompts"]
    n_seq = len(batches[0])
    per_seq = len(batches[0][0]) + spec["batch_new_tokens"]
    try:
        decoder = BatchDecoder(spec["model"], spec["n_threads"], n_seq * per_seq, n_seq)
        try:
            decode_batch = [
                decoder.run(b, new_tokens("batch_new_tokens", i)) for i, b in enumerate(batches)
            ][1:]
        finally:
            decoder.close()
    except (RuntimeError, AttributeError) as error:  # a binding without this batch API
        decode_batch = {"na": f"llama_batch path failed: {error}"}
    return {
        "version": llama_cpp.__version__,
        "ttft_s": ttft,
        "decode_b1": decode_b1,
        "decode_batch": decode_batch,
    }


if __name__ == "__main__":
    json.dump(measure(json.load(sys.stdin)), sys.stdout)
