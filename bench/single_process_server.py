"""The previous architecture of `kvserve serve`, kept for comparison in `serve_aiperf.py`: one
process, the engine core's loop in a background thread of the HTTP process (the front end's
event loop and the step loop share one GIL). Same flags as `kvserve serve` for the engine,
plus --host/--port; SIGTERM drains and exits 0.

    .venv/bin/python bench/single_process_server.py --port 8001 --dtype float32
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from kvserve.cli.args import add_engine_args, engine_config_from_args
from kvserve.cli.graceful_server import GracefulServer
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.builder import build_engine
from kvserve.model.embedded import EMBEDDED_NAME
from kvserve.server.app import begin_drain, build_app
from kvserve.server.metrics import ServerMetrics


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_engine_args(parser)
    args = parser.parse_args()
    core, tokenizer = build_engine(engine_config_from_args(args))
    engine = AsyncEngine.in_thread(core, tokenizer)
    engine.start()
    metrics = ServerMetrics(model_name=EMBEDDED_NAME)
    app = build_app(engine, tokenizer, EMBEDDED_NAME, metrics=metrics)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None)
    GracefulServer(config, on_exit=lambda: begin_drain(app, 30.0)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
