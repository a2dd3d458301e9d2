"""`kvserve generate`: stream one completion to the terminal."""

from __future__ import annotations

import sys

from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams


def run_generate(llm: LLM, prompt: str, params: SamplingParams, chat_template: bool) -> int:
    """Print tokens as they arrive, then a one-line summary on stderr."""
    try:
        source = (
            llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            if chat_template
            else prompt
        )
        output = None
        for delta in llm.stream(source, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if params.logprobs is not None and delta.output.logprobs:
                _print_logprob(delta.output.logprobs[-1])
            output = delta.output
    except ValueError as error:
        print(f"kvserve: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    if output is not None:
        _print_summary(output)
    return 0


def _print_logprob(entry) -> None:
    alternatives = ", ".join(f"{text!r}: {lp:.3f}" for _, text, lp in entry.top_logprobs)
    print(f"  [{entry.token!r}: {entry.logprob:.3f}; {alternatives}]", file=sys.stderr)


def _print_summary(output) -> None:
    ttft = output.time_to_first_token or 0.0
    gaps = output.inter_token_latencies
    rate = len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else float("nan")
    print(
        f"[{len(output.prompt_token_ids)} prompt tokens, {len(output.token_ids)} generated, "
        f"finish_reason={output.finish_reason}, time to first token {ttft * 1000:.0f} ms, "
        f"decode {rate:.1f} tokens/s]",
        file=sys.stderr,
    )
