"""``--kv-host`` and ``--kv-port``: where an engine's /kv routes listen, and every refusal naming
the flag (before the model loads)."""

from __future__ import annotations

import argparse

import pytest

from kvserve.cli.kv_listener_args import KVListener, kv_listener_from_args
from kvserve.cli.main import main
from kvserve.disagg.kv_secret import KVSecret

SECRET = KVSecret("a-test-secret-0123456789")


def _args(role: str = "prefill", kv_host: str | None = None, kv_port: int | None = None,
          host: str = "127.0.0.1", port: int = 8000) -> argparse.Namespace:
    return argparse.Namespace(role=role, host=host, port=port, kv_host=kv_host, kv_port=kv_port)


def test_without_the_flags_the_kv_routes_share_the_public_listener() -> None:
    listener = kv_listener_from_args(_args())
    assert listener == KVListener("127.0.0.1", 8000)
    assert (listener.separate, listener.url) == (False, "http://127.0.0.1:8000")
    assert kv_listener_from_args(_args(role="colocated")) is None


def test_a_kv_port_is_a_listener_of_its_own_on_the_public_host_by_default() -> None:
    listener = kv_listener_from_args(_args(kv_port=8200, host="0.0.0.0"))
    assert (listener.separate, listener.host, listener.port) == (True, "0.0.0.0", 8200)
    listener = kv_listener_from_args(_args(kv_host="::1", kv_port=8200, host="0.0.0.0"))
    assert listener.url == "http://[::1]:8200"
    # the same port on two distinct addresses is two listeners
    assert kv_listener_from_args(_args(kv_host="127.0.0.2", kv_port=8000)).port == 8000


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_kv_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match=f"^--kv-port must be in 1..65535, got {port}$"):
        kv_listener_from_args(_args(kv_port=port))


@pytest.mark.parametrize(("host", "kv_host"), [("127.0.0.1", None), ("127.0.0.1", "127.0.0.1"),
                                               ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "::")])
def test_the_public_port_on_the_same_host_is_refused(host: str, kv_host: str | None) -> None:
    with pytest.raises(ValueError, match="^--kv-port 8000 is the public --port on the same host"):
        kv_listener_from_args(_args(host=host, kv_host=kv_host, kv_port=8000))


def test_kv_flags_without_a_role_or_a_port_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^--kv-host and --kv-port: only an engine with --role"):
        kv_listener_from_args(_args(role="colocated", kv_host="127.0.0.1", kv_port=8200))
    with pytest.raises(ValueError, match="^--kv-host 127.0.0.1 needs --kv-port"):
        kv_listener_from_args(_args(kv_host="127.0.0.1"))


def test_the_start_line_says_where_and_whether_authenticated() -> None:
    listener = KVListener("0.0.0.0", 8000, "127.0.0.1", 8200)
    assert listener.describe(SECRET) == (
        "/kv routes on http://127.0.0.1:8200 (their own listener; each needs the X-KV-Secret "
        "header (--kv-secret)); give `kvserve router` this URL")
    assert listener.describe(None) == (
        "/kv routes on http://127.0.0.1:8200 (their own listener; no credential (no "
        "--kv-secret): loopback only); give `kvserve router` this URL")
    assert "(the public listener;" in KVListener("127.0.0.1", 8000).describe(None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--kv-port", "8200"], "--kv-port: only an engine with --role prefill|decode has /kv "
     "routes; leave the flag out, or give --role"),
    (["--role", "decode", "--kv-rank", "1", "--kv-world-size", "2", "--kv-port", "99999"],
     "--kv-port must be in 1..65535, got 99999"),
    (["--role", "decode", "--kv-rank", "1", "--kv-world-size", "2", "--kv-host", "0.0.0.0",
      "--kv-port", "8200"],
     "--role decode without --kv-secret would serve the /kv routes (reserve, prefill, "
     "continue, cancel) to anyone who reaches --kv-host 0.0.0.0; give the engines and the "
     "router the same --kv-secret or --kv-secret-file, or listen on 127.0.0.1"),
    (["--role", "prefill", "--kv-rank", "0", "--kv-world-size", "2", "--host", "0.0.0.0",
      "--kv-port", "8200"],
     "--role prefill without --kv-secret would serve the /kv routes (reserve, prefill, "
     "continue, cancel) to anyone who reaches --host 0.0.0.0; give the engines and the "
     "router the same --kv-secret or --kv-secret-file, or listen on 127.0.0.1"),
    (["--disaggregated", "--kv-port", "8200"], "--kv-port: a --disaggregated set serves each "
     "engine's /kv routes on that engine's port (after --port), behind the set's KV secret; "
     "to give them ports of their own, start the engines (`kvserve serve --role "
     "prefill|decode --kv-port N`) and `kvserve router` yourself"),
])
def test_serve_refuses_before_loading_the_model(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err == f"kvserve: error: {message}\n"


def test_a_port_in_use_is_an_error_naming_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from kvserve.cli.listeners import bind

    taken = bind("127.0.0.1", 0, "test")
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--role", "decode", "--kv-rank", "1", "--kv-world-size", "2",
                     "--port", str(port), "--kv-port", "1"]) == 2
    finally:
        taken.close()
    assert capsys.readouterr().err == (f"kvserve: error: --host/--port: cannot listen on "
                                       f"127.0.0.1:{port} (Address already in use)\n")


def test_without_a_secret_only_the_kv_address_must_be_loopback() -> None:
    from kvserve.disagg.kv_secret import check_role_host

    listener = kv_listener_from_args(_args(host="0.0.0.0", kv_host="127.0.0.1", kv_port=8200))
    warning = check_role_host("decode", listener.host, None, "--kv-host")
    assert warning is not None and "listens for them on 127.0.0.1 only" in warning
