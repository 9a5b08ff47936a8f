"""`aserve serve`: load the model, start the HTTP server, stop cleanly on SIGINT/SIGTERM."""

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aserve.config import Config, ConfigError, load_config

log = logging.getLogger("aserve")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aserve", description="OpenAI-compatible LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API",
                           description="Options override the config file; see config.toml for every setting.")
    serve.add_argument("--config", type=Path, help="TOML config file (default: ./config.toml if present)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    opts = {
        "server": [("--host", str), ("--port", int), ("--served-model-name", str), ("--max-body-bytes", int),
                   ("--shutdown-timeout", float)],
        "model": [("--model", str), ("--cache-dir", str), ("--device", str), ("--dtype", str),
                  ("--max-model-len", int)],
        "engine": [("--max-num-seqs", int), ("--max-num-batched-tokens", int), ("--num-threads", int),
                   ("--seed", int)],
    }
    for section, items in opts.items():
        group = serve.add_argument_group(f"[{section}]")
        for flag, kind in items:
            key = "path" if flag == "--model" else flag[2:].replace("-", "_")
            group.add_argument(flag, type=kind, dest=f"{section}.{key}", metavar=kind.__name__.upper())
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


async def _serve(config: Config) -> None:
    from aserve.launch import build_state
    from aserve.server.app import create_app, start_server

    state = build_state(config)  # before listening: /health answers 200 only with a model loaded
    app = create_app(state, config.server.max_body_bytes)
    runner = await start_server(app, config.server.host, config.server.port, config.server.shutdown_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    print(f"aserve: serving {state.model_name!r} at http://{host}:{port} (OpenAI API under /v1)", flush=True)
    await stop.wait()
    print("aserve: shutting down", flush=True)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = args.config or (Path("config.toml") if Path("config.toml").is_file() else None)
    try:
        config = load_config(config_path, _overrides(args))
        runner = _event_loop_runner()
        runner(_serve(config))
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        print("aserve: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, OSError) as exc:
        print(f"aserve: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from aserve.models.loader import UnsupportedModelError
        from aserve.models.store import ModelStoreError

        if isinstance(exc, (ModelStoreError, UnsupportedModelError)):
            print(f"aserve: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.run
