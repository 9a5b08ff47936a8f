"""`aserve serve`: load the model, start the HTTP server, stop cleanly on SIGINT/SIGTERM."""

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from aserve.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from aserve.server.serving import ServingState


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aserve", description="OpenAI-compatible LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API",
                           description="Options override the config file; see config.toml for every setting.")
    serve.add_argument("--config", type=Path, help="TOML config file (default: ./config.toml if present)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # One flag per config setting, named after it (model.path is --model), typed by its annotation.
    for section in fields(Config):
        group = serve.add_argument_group(f"[{section.name}]")
        for setting in fields(section.type):
            kind = _flag_type(setting.type)
            name = "model" if (section.name, setting.name) == ("model", "path") else setting.name
            flag = "--" + name.replace("_", "-")
            metavar = "{true,false}" if kind is _bool else kind.__name__.upper()
            group.add_argument(flag, type=kind, dest=f"{section.name}.{setting.name}", metavar=metavar)
    return parser


def _flag_type(annotation: object) -> Callable[[str], object]:
    """int, float, str, bool, or one of them | None (a flag always gives a value)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
    return _bool if annotation is bool else annotation  # type: ignore[return-value]


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false")
    return text.lower() == "true"


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


async def _serve(config: Config, state: "ServingState") -> None:
    from aserve.server.app import create_app, server_ssl_context, start_server

    app = create_app(state)
    runner = await start_server(app, config.server.host, config.server.port, config.server.shutdown_timeout,
                                server_ssl_context(config.server))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    scheme = "https" if config.server.ssl_certfile else "http"
    print(f"aserve: serving {state.model_name!r} at {scheme}://{host}:{port} (OpenAI API under /v1)", flush=True)
    await stop.wait()
    print("aserve: shutting down", flush=True)
    # Stop taking requests: the socket stays open, so a new request hears why (503 shutting_down)
    # instead of a refused connection. Running requests get shutdown_timeout seconds to finish;
    # then the engine ends the rest, each stream with an error event and [DONE], and only then
    # does aiohttp close the connections, its handlers all done (one still running when aiohttp's
    # own timeout ran out would lose its [DONE] and make aiohttp log a traceback).
    state.draining = True
    deadline = loop.time() + max(config.server.shutdown_timeout, 0.0)
    while state.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    state.engine.close("the server is shutting down", "shutting_down")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = args.config or (Path("config.toml") if Path("config.toml").is_file() else None)
    # Until the event loop installs its own handlers, SIGINT and SIGTERM interrupt whatever runs (a
    # download, a conversion, loading): the model is loaded before the loop starts, on this thread, so
    # that both signals stop it at once and its clean-up (`finally`, temporary dirs) runs. Inside the
    # loop, a blocking load held off SIGINT until it had finished, and SIGTERM killed the process
    # outright, leaving partial conversion dirs in the cache.
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise _Interrupted

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = load_config(config_path, _overrides(args))
        from aserve.launch import build_state

        state = build_state(config)  # before listening: /health answers 200 only with a model loaded
        # Loading leaves many long-lived objects (torch, transformers, the tokenizer): a full
        # collection over them took up to 180 ms at start, with the GIL held, which would stall
        # every stream if one came while serving. Frozen, they are never scanned again.
        gc.collect()
        gc.freeze()
        runner = _event_loop_runner()
        runner(_serve(config, state))
    except (_Interrupted, KeyboardInterrupt):  # a signal while the model was still loading
        _interrupted(received[0] if received else signal.SIGINT)
    except Exception as exc:
        if received:  # library code (torch) can turn the interrupt into an exception of its own
            _interrupted(received[0])
        if isinstance(exc, (ConfigError, ValueError, OSError)) or _is_model_error(exc):
            print(f"aserve: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def _is_model_error(exc: Exception) -> bool:
    from aserve.models.loader import UnsupportedModelError
    from aserve.models.store import ModelStoreError

    return isinstance(exc, (ModelStoreError, UnsupportedModelError))


class _Interrupted(BaseException):
    """Raised by SIGINT/SIGTERM while loading. Not a KeyboardInterrupt: CPython can remember a
    KeyboardInterrupt that passed through C-level code during loading and then kill the process with
    SIGINT at exit although we caught it (seen in about 1 of 3 SIGTERMs during a conversion)."""


def _interrupted(signum: int) -> NoReturn:
    print(f"aserve: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The model may still be loading on the model thread, which nothing can interrupt and which
    # the interpreter would wait for at exit (seconds, or minutes for a large model): leave now.
    # Nothing is served yet, and an interrupted conversion has already removed its partial files.
    os._exit(128 + signum)


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.run
