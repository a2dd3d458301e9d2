"""`kvserve chat`: an interactive terminal chat that keeps the conversation history."""

from __future__ import annotations

import sys

from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams


def run_chat(llm: LLM, params: SamplingParams, system: str | None, stdin=None) -> int:
    """Read user turns from stdin, stream replies, keep history; /reset and /exit commands."""
    stdin = stdin or sys.stdin
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    print("kvserve chat: type a message; /reset clears history, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            history = history[:1] if system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        prompt_ids = llm.tokenizer.apply_chat_template(history)
        reply = ""
        try:
            for delta in llm.stream(prompt_ids, params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                reply = delta.output.text
        except ValueError as error:
            history.pop()
            print(f"\nkvserve: error: {error}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
