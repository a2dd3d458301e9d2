"""`kvserve router`: the OpenAI-compatible front door of prefill and decode engines."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("kvserve")


def add_router_parser(commands: argparse._SubParsersAction) -> None:
    router = commands.add_parser(
        "router",
        help="serve OpenAI's /v1/completions through prefill and decode engines",
        description="Send each request to a decode engine (to reserve blocks), a prefill "
        "engine (to compute and stream the KV layer by layer), then stream the decode "
        "engine's tokens. Engines are `kvserve serve --role prefill|decode` servers.",
    )
    router.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                        help="base URLs of prefill engines, e.g. http://127.0.0.1:8100")
    router.add_argument("--decode", nargs="+", required=True, metavar="URL",
                        help="base URLs of decode engines")
    router.add_argument("--model", default=None,
                        help="the model the engines serve, for its tokenizer (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    router.add_argument("--served-model-name", default=None, help="the name clients see")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from kvserve.disagg.router import Router, build_router_app
    from kvserve.model.embedded import EMBEDDED_NAME
    from kvserve.model.source import resolve_model_source
    from kvserve.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_source(args.model))
    name = args.served_model_name or args.model or EMBEDDED_NAME
    app = build_router_app(Router(args.prefill, args.decode), tokenizer, name)
    logger.info("routing %s on http://%s:%d/v1: prefill %s, decode %s", name, args.host,
                args.port, args.prefill, args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    return 0
