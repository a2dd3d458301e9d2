"""`kvserve` command line: generate, chat, serve and bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from kvserve.cli.analyze import add_analyze_parser, run_analyze
from kvserve.cli.args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)
from kvserve.cli.bench import add_bench_parser, run_bench
from kvserve.cli.router import add_router_parser, run_router
from kvserve.cli.serve import add_serve_parser, run_serve
from kvserve.config import EngineConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve",
        description="An LLM inference engine over a paged KV cache. With no --model, it runs the "
        "embedded SmolLM2-135M-Instruct.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate",
        help="complete a prompt, streaming tokens to the terminal",
        description="Complete PROMPT and stream the tokens as they are generated.",
    )
    generate.add_argument("prompt", help="the text to complete")
    generate.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    add_sampling_args(generate, default_max_tokens=128)
    add_engine_args(generate)
    chat = commands.add_parser(
        "chat",
        help="interactive chat in the terminal, with history",
        description="Chat with the model. Commands: /reset clears the history, /exit quits "
        "(or Ctrl-D).",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, default_max_tokens=512)
    add_engine_args(chat)
    add_serve_parser(commands)
    add_bench_parser(commands)
    add_router_parser(commands)
    add_analyze_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "bench":
        return run_bench(args, sys.argv[1:] if argv is None else argv)
    if args.command == "analyze":
        try:
            return run_analyze(args)
        except (ValueError, FileNotFoundError) as error:
            print(f"kvserve: error: {error}", file=sys.stderr)
            return 2
    if args.command in ("serve", "router"):
        try:
            if args.command == "router":
                return run_router(args)
            return run_serve(args, sys.argv[1:] if argv is None else argv)
        except (ValueError, FileNotFoundError) as error:
            print(f"kvserve: error: {error}", file=sys.stderr)
            return 2
    try:
        engine_config = engine_config_from_args(args)
        params = sampling_params_from_args(args)
        from kvserve.engine.llm import LLM

        llm = LLM(engine_config.model, **_engine_options(engine_config))
    except (ValueError, FileNotFoundError) as error:
        print(f"kvserve: error: {error}", file=sys.stderr)
        return 2
    if args.command == "generate":
        from kvserve.cli.generate import run_generate

        return run_generate(llm, args.prompt, params, args.chat_template)
    from kvserve.cli.chat import run_chat

    return run_chat(llm, params, args.system)


def _engine_options(config: EngineConfig) -> dict:
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "model"
    }


if __name__ == "__main__":
    sys.exit(main())
