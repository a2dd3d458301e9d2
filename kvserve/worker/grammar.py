"""Structured outputs: a request's grammar, compiled with xgrammar, turned into a token mask
each step, and advanced by each token it samples.

Why xgrammar: on this project's CPU it filled a JSON schema's mask and accepted a token in
about 7 us a token, against 75 us for llguidance (compiling took 4.7 and 1.2 ms), and the step
loop pays the per-token cost (measured with the embedded tokenizer; see docs/benchmarks.md).

A grammar is ``SamplingParams.structured``, ``(kind, spec)`` (see ``kvserve.structured``,
which also validates one without a tokenizer, for the front end's 400). ``Grammars`` compiles
them for this model's vocabulary (cached by spec, on a worker thread) and keeps one matcher per
request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvserve.structured import build_grammar, xgrammar_module

logger = logging.getLogger("kvserve")

CACHE_SIZE = 256  # compiled grammars kept, by spec


class Grammars:
    """Compiled grammars for one vocabulary, and each running request's matcher."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvserve-grammar")
        self._matchers: dict[str, Any] = {}

    def compile(self, kind: str, spec: str) -> Future:
        """The compiled grammar of ``(kind, spec)``, as a future: cached, else compiled on a
        worker thread so that the step loop never waits for a long compile."""
        key = (kind, spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, kind, spec)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, kind: str, spec: str) -> Any:
        xgr = xgrammar_module()
        if self._compiler is None:  # building the tokenizer's trie takes ~0.1 s, once
            info = xgr.TokenizerInfo.from_huggingface(self._hf_tokenizer,
                                                      vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(build_grammar(kind, spec))

    def start(self, request_id: str, compiled: Any) -> None:
        self._matchers[request_id] = xgrammar_module().GrammarMatcher(compiled)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def bitmask(self, request_ids: list[str]) -> torch.Tensor:
        """[len(request_ids), ceil(vocab / 32)] int32: bit ``t`` of row ``i`` is set when token
        ``t`` may come next for request ``i``."""
        xgr = xgrammar_module()
        mask = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        for row, request_id in enumerate(request_ids):
            self._matchers[request_id].fill_next_token_bitmask(mask, row)
        return mask

    def accept(self, request_id: str, token_id: int) -> None:
        matcher = self._matchers.get(request_id)
        if matcher is not None and not matcher.accept_token(token_id):
            logger.error("request %s sampled token %d that its grammar refuses", request_id,
                         token_id)

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
