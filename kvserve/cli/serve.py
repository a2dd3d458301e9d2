"""`kvserve serve`: the OpenAI-compatible HTTP server, under uvicorn.

On SIGTERM (or Ctrl-C) the server stops accepting connections, refuses new requests, lets the
ones in flight finish for ``--shutdown-timeout`` seconds, ends the rest with an error event,
and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from kvserve.cli.args import add_engine_args, engine_config_from_args
from kvserve.cli.auth_args import (
    add_api_key_args,
    add_kv_secret_args,
    api_keys_from_args,
    kv_secret_from_args,
)
from kvserve.cli.kv_listener_args import (
    KVListener,
    add_kv_listener_args,
    check_no_kv_listener_for_a_set,
    kv_listener_from_args,
)
from kvserve.cli.limit_args import add_limit_args, limits_from_args
from kvserve.config import KVRole
from kvserve.model.embedded import EMBEDDED_NAME

if TYPE_CHECKING:
    import socket

    from fastapi import FastAPI

    from kvserve.disagg.kv_secret import KVSecret

logger = logging.getLogger("kvserve")

# uvicorn's own limit, past ours: connections still open then are closed
UVICORN_EXTRA_GRACE_S = 5
# after the engine process dies: /health answers 503 this long, then the server exits non-zero
DEAD_ENGINE_EXIT_DELAY_S = 2.0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve the model over HTTP with OpenAI's API: POST /v1/chat/completions, "
        "POST /v1/completions, GET /v1/models, GET /v1/stats, GET /health, GET /metrics.",
    )
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_api_key_args(group)
    group.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="most requests waiting for a place in the batch; beyond it, 429 with Retry-After "
        "(default: unbounded)",
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and see (default: SmolLM2-135M-Instruct for the "
        "embedded model, else --model as given)",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template that replaces the model's own for /v1/chat/completions "
        "(as a tokenizer_config.json's chat_template: messages, tools, add_generation_prompt)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM before they are aborted",
    )
    add_limit_args(serve)
    kv = serve.add_argument_group("disaggregation (see `kvserve router`)")
    kv.add_argument("--role", choices=("colocated", "prefill", "decode"), default="colocated",
                    help="prefill: compute prompts and stream their KV to decode engines; "
                    "decode: take KV from prefill engines and generate (default: both)")
    kv.add_argument("--kv-rank", type=int, default=None,
                    help="this engine's rank among all prefill and decode engines")
    kv.add_argument("--kv-world-size", type=int, default=None,
                    help="how many prefill and decode engines there are")
    kv.add_argument("--kv-master", default="127.0.0.1:29500",
                    help="HOST:PORT where the engines meet (rank 0 listens there)")
    add_kv_secret_args(kv, "with --role prefill|decode, every /kv route needs it (without it "
                       "the /kv routes listen on loopback only); with --disaggregated, the "
                       "set's secret (default: a random one)")
    add_kv_listener_args(kv)
    kv.add_argument("--kv-transfer-timeout", type=float, default=KVRole.transfer_timeout_s,
                    metavar="SECONDS",
                    help="a prefill engine frees the blocks of KV the decode engine does not "
                    "take in this time; a decode engine cancels a transfer it was asked to "
                    "admit that does not arrive in it (default 30)")
    kv.add_argument("--kv-reservation-lease", type=float,
                    default=KVRole.reservation_lease_s, metavar="SECONDS",
                    help="a decode engine frees a reservation whose request nobody asked it "
                    "to admit in this time (the router or the prefill went away; default 60)")
    kv.add_argument("--engine-timeout", type=float, default=None, metavar="SECONDS",
                    help="with --disaggregated: the router's --engine-timeout (default 120)")
    kv.add_argument("--disaggregated", action="store_true",
                    help="start prefill engines, decode engines and the router on this machine "
                    "(the router on --port, the engines on the ports after it)")
    kv.add_argument("--prefill-devices", nargs="+", default=["auto"], metavar="DEVICE",
                    help="with --disaggregated: one prefill engine per device (default: one)")
    kv.add_argument("--decode-devices", nargs="+", default=["auto"], metavar="DEVICE",
                    help="with --disaggregated: one decode engine per device (default: one)")
    add_engine_args(serve)


def run_serve(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Load the engine, then serve until SIGTERM or Ctrl-C; returns the exit code.
    ``argv`` (the command line after ``kvserve``) is what ``--disaggregated`` passes on."""
    if args.disaggregated:
        from kvserve.disagg import launcher

        serve_argv = argv or []
        serve_argv = serve_argv[serve_argv.index("serve") + 1 :] if "serve" in serve_argv else []
        api_keys_from_args(args)  # a bad --api-key-file is an error here, not in each process
        check_no_kv_listener_for_a_set(args)
        with launcher.secret_file(kv_secret_from_args(args)) as secret_path:
            return launcher.run(launcher.commands(
                serve_argv, args.host, args.port, args.prefill_devices, args.decode_devices,
                launcher.free_port(args.host), secret_path,
            ))
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.server.app import begin_drain, build_app
    from kvserve.server.metrics import ServerMetrics

    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    limits = limits_from_args(args)
    api_keys = api_keys_from_args(args)
    kv_secret = kv_secret_from_args(args)
    kv_listener = kv_listener_from_args(args)
    kv_role = None
    if kv_listener is not None:
        if args.kv_rank is None or args.kv_world_size is None:
            raise ValueError(f"--role {args.role} needs --kv-rank and --kv-world-size")
        kv_role = KVRole(args.role, args.kv_rank, args.kv_world_size, args.kv_master,
                         args.kv_transfer_timeout, args.kv_reservation_lease)
        _warn_about_open_kv_routes(args.role, kv_listener, kv_secret)
    elif kv_secret is not None:
        raise ValueError("--kv-secret and --kv-secret-file protect the /kv routes of --role "
                         "prefill|decode engines (or a --disaggregated set); this server has "
                         "none: leave the flag out, or give --role")
    chat_template = read_chat_template(args.chat_template) if args.chat_template else None
    engine_config = engine_config_from_args(args)  # reads --tenant-config (ValueError if bad)
    tenant_config = engine_config.tenant_config
    assert not isinstance(tenant_config, str)  # EngineConfig loaded the file
    # bound before the model loads, so that a port in use is an error at once
    sockets = _bind_listeners(args.host, args.port, kv_listener)
    engine = AsyncEngine.in_process(engine_config, max_queue=args.max_queue, kv_role=kv_role)
    if chat_template is not None:
        engine.tokenizer.replace_chat_template(chat_template)
    engine.start()  # the engine process loads the model; this one only the tokenizer
    model_name = args.served_model_name or (args.model if args.model else EMBEDDED_NAME)
    app = build_app(
        engine,
        engine.tokenizer,
        model_name,
        api_keys=api_keys,
        metrics=ServerMetrics(
            model_name=model_name,
            client_names=api_keys.names if api_keys else (),
            tenant_names=tenant_config.names if tenant_config else (),
        ),
        limits=limits,
        tenant_config=tenant_config,
    )
    import uvicorn

    from kvserve.cli.graceful_server import GracefulServer

    served: object = app
    if kv_role is not None:
        assert kv_listener is not None
        served = _add_role(app, kv_role, kv_secret, sockets)
        logger.info("%s", kv_listener.describe(kv_secret))
    config = uvicorn.Config(
        served,
        host=args.host,
        port=args.port,
        log_config=None,  # our logging setup (kvserve.cli.main) formats uvicorn's lines too
        timeout_graceful_shutdown=int(args.shutdown_timeout) + UVICORN_EXTRA_GRACE_S,
    )
    server = GracefulServer(config, on_exit=lambda: begin_drain(app, args.shutdown_timeout))

    def engine_died(reason: str) -> None:
        timer = threading.Timer(DEAD_ENGINE_EXIT_DELAY_S, server.fail, args=(reason,))
        timer.daemon = True
        timer.start()

    engine.on_dead = engine_died
    logger.info("serving %s on http://%s:%d/v1%s", model_name, args.host, args.port,
                " (not its /kv routes)" if sockets else "")
    try:
        server.run(sockets=sockets or None)
    finally:
        engine.shutdown(timeout=0.0)
    if server.failure is not None:
        return 1
    return 0 if server.started else 1


def read_chat_template(path: str) -> str:
    """The text of ``--chat-template FILE``, checked before the model loads: a ValueError
    naming the flag and the file if it cannot be read or does not parse."""
    from kvserve.model.tokenizer import check_chat_template

    try:
        template = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"--chat-template {path}: cannot read it ({error.strerror})") from None
    try:
        check_chat_template(template)
    except ValueError as error:
        raise ValueError(f"--chat-template {path}: not a valid Jinja template: {error}") from None
    return template


def _warn_about_open_kv_routes(
    role: str, kv_listener: KVListener, kv_secret: KVSecret | None
) -> None:
    """Refuse /kv routes on a non-loopback address without a secret; warn on loopback that
    they are open."""
    from kvserve.disagg.kv_secret import check_role_host

    flag = "--kv-host" if kv_listener.kv_host is not None else "--host"
    warning = check_role_host(role, kv_listener.host, kv_secret, flag)
    if warning is not None:
        logger.warning("%s", warning)


def _bind_listeners(
    host: str, port: int, kv_listener: KVListener | None
) -> list[socket.socket]:
    """The public and the KV sockets, bound, when the /kv routes have a listener of their own
    (``--kv-port``); else none (uvicorn binds ``--host``:``--port`` itself)."""
    from kvserve.cli.listeners import bind

    if kv_listener is None or not kv_listener.separate:
        return []
    public = bind(host, port, "--host/--port")
    try:
        return [public, bind(kv_listener.host, kv_listener.port, "--kv-host/--kv-port")]
    except ValueError:
        public.close()
        raise


def _add_role(
    app: FastAPI, kv_role: KVRole, kv_secret: KVSecret | None, sockets: list[socket.socket]
) -> object:
    """The ASGI app to serve: ``app`` with the role's /kv routes when they share its listener
    (no ``sockets``), else ``app`` on ``sockets[0]`` and the /kv routes alone on
    ``sockets[1]`` (``cli.listeners.ByListener``)."""
    from kvserve.cli.listeners import ByListener, Listener
    from kvserve.disagg.kv_app import build_kv_app, kv_routes

    routes = kv_routes(app, kv_role, kv_secret)
    if not sockets:
        app.include_router(routes)
        return app
    public, kv = sockets
    return ByListener([(Listener.of(public), app), (Listener.of(kv), build_kv_app(routes))])
