"""`kvserve router`: the OpenAI-compatible front door of prefill and decode engines."""

from __future__ import annotations

import argparse
import logging

from kvserve.cli.auth_args import (
    add_api_key_args,
    add_kv_secret_args,
    api_keys_from_args,
    kv_secret_from_args,
)
from kvserve.cli.limit_args import add_limit_args, limits_from_args
from kvserve.disagg.router import ENGINE_TIMEOUT_S

logger = logging.getLogger("kvserve")

UVICORN_EXTRA_GRACE_S = 5


def add_router_parser(commands: argparse._SubParsersAction) -> None:
    router = commands.add_parser(
        "router",
        help="serve OpenAI's API through prefill and decode engines",
        description="Send each request to a decode engine (to reserve blocks), a prefill "
        "engine (to compute and stream the KV layer by layer, and sample the first token), "
        "then stream the decode engine's tokens. The API is `kvserve serve`'s, answered "
        "alike. Engines are `kvserve serve --role prefill|decode` servers.",
    )
    router.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                        help="base URLs of the prefill engines' /kv routes, e.g. "
                        "http://127.0.0.1:8100: an engine's --kv-host and --kv-port when it "
                        "has them, else its --host and --port")
    router.add_argument("--decode", nargs="+", required=True, metavar="URL",
                        help="base URLs of the decode engines' /kv routes (as --prefill)")
    router.add_argument("--model", default=None,
                        help="the model the engines serve, for its tokenizer (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    router.add_argument("--served-model-name", default=None, help="the name clients see")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    add_api_key_args(router)
    add_kv_secret_args(router, "sent on every /kv call; the engines' own")
    router.add_argument("--chat-template", default=None, metavar="FILE",
                        help="the Jinja chat template the engines were given (`kvserve serve "
                        "--chat-template`): the router renders chats itself")
    router.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM")
    router.add_argument("--engine-timeout", type=float, default=ENGINE_TIMEOUT_S,
                        metavar="SECONDS",
                        help="the longest the router waits for an engine's answer or its next "
                        "streamed line; past it the request fails with a 502 naming the "
                        "engine, which is skipped for a while (default 120: above the "
                        "engines' --kv-transfer-timeout)")
    add_limit_args(router)


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from kvserve.cli.graceful_server import GracefulServer
    from kvserve.cli.serve import read_chat_template
    from kvserve.disagg.router import Router
    from kvserve.disagg.router_app import build_router_app
    from kvserve.model.embedded import EMBEDDED_NAME
    from kvserve.model.source import resolve_model_source
    from kvserve.model.tokenizer import load_tokenizer
    from kvserve.server.app import begin_drain

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    chat_template = read_chat_template(args.chat_template) if args.chat_template else None
    limits = limits_from_args(args)
    api_keys = api_keys_from_args(args)
    kv_secret = kv_secret_from_args(args)
    tokenizer = load_tokenizer(resolve_model_source(args.model))
    if chat_template is not None:
        tokenizer.replace_chat_template(chat_template)
    name = args.served_model_name or args.model or EMBEDDED_NAME
    router = Router(args.prefill, args.decode, kv_secret=kv_secret,
                    engine_timeout_s=args.engine_timeout)
    app = build_router_app(router, tokenizer, name, api_keys=api_keys, limits=limits)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            timeout_graceful_shutdown=int(args.shutdown_timeout)
                            + UVICORN_EXTRA_GRACE_S)
    server = GracefulServer(config, on_exit=lambda: begin_drain(app, args.shutdown_timeout))
    logger.info("routing %s on http://%s:%d/v1: prefill %s, decode %s", name, args.host,
                args.port, args.prefill, args.decode)
    server.run()
    return 0 if server.started else 1
