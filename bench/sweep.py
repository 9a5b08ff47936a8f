#!/usr/bin/env python
"""Concurrency sweep over one or more servers, with a comparison against a baseline.

For each target (NAME=URL) it runs bench/load.py's levels (closed-loop streaming clients,
the same fixed prompt set, /health probed from a side process) at every concurrency in
--concurrency, one target after the other, and prints per target and level: output
tokens/s, requests/s, TTFT and ITL p50/p95/p99, /health p99 and errors; then, per level,
each target's figures divided by those of --baseline. --json writes everything, --plot a
PNG (throughput, TTFT and ITL against concurrency, one line per target).

    python bench/sweep.py --target aserve=http://127.0.0.1:8000 --target baseline=http://127.0.0.1:8001 \\
        --json bench/results/sweep.json --plot bench/results/sweep.png

--start-aserve=ARGS / --start-baseline=ARGS start the server themselves (`aserve serve ARGS`,
`bench/baseline_server.py ARGS`), each just before its own sweep and stopped right after
it, so two servers never share the CPU. Write them with '=' (ARGS begins with '--'):
--start-aserve="--port 8401 --max-num-seqs 8". --start-aserve-as=NAME=ARGS (repeatable) starts
further aserve configurations under their own names, to compare them in the same run.

--start-llamacpp="PATH ARGS" starts llama.cpp's server (PATH: the llama-server binary you
built; never downloaded here) as target 'llama.cpp', and sends it "cache_prompt": false so
that, like aserve's cold prompts, every prompt is computed. Give every server the same
tokens with --system-prompt (SmolLM2's template inserts a default system prompt that
llama.cpp's template handling may not):

    python bench/sweep.py --concurrency 1 8 32 --system-prompt "You are a helpful AI assistant named SmolLM, trained by Hugging Face" \
        --start-aserve="--port 8401" \
        --start-llamacpp="$LLAMA/llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --port 8402 -t 2 -np 32 -c 65536"
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (bench/load.py)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PORTS = {"aserve": 8000, "baseline": 8001, "llamacpp": 8080}
# Fields a server needs in every request body to be measured like the others.
EXTRA_BODY = {"llamacpp": {"cache_prompt": False}}
# (label, getter, higher is better) for the ratio table and JSON.
RATIO_METRICS = (
    ("out_tok/s", lambda lv: lv.output_tokens_per_s, True),
    ("req/s", lambda lv: lv.requests_per_s, True),
    ("ttft_p50", lambda lv: lv.ttft_ms.p50, False),
    ("ttft_p95", lambda lv: lv.ttft_ms.p95, False),
    ("itl_p50", lambda lv: lv.itl_ms.p50, False),
    ("itl_p95", lambda lv: lv.itl_ms.p95, False),
)


@dataclass
class Target:
    name: str
    url: str
    command: list[str] | None = None  # set when this script starts the server
    model: str | None = None
    levels: list[load.LevelResult] = field(default_factory=list)
    ceiling_args: str | None = None  # runner_ceiling.py ARGS from --ceiling; None: no ceiling column
    ceiling: dict[int, float] = field(default_factory=dict)  # batch -> model runner tokens/s
    extra_body: dict[str, Any] = field(default_factory=dict)
    # A new connection per request: llama.cpp's HTTP server closes kept-alive connections after
    # a few requests, and a request sent on one it has just closed fails before it is read.
    force_close: bool = False
    error: str | None = None  # the whole target failed (server did not start, warm-up failed, ...)


# ---------------------------------------------------------------------------
# Servers started by the sweep
# ---------------------------------------------------------------------------
def start_command(kind: str, arg_string: str) -> tuple[list[str], str]:
    extra = shlex.split(arg_string)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--host", default="127.0.0.1")
    peek.add_argument("--port", type=int, default=DEFAULT_PORTS[kind])
    known, _ = peek.parse_known_args(extra)
    if known.host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"--start-{kind}: only 127.0.0.1 is supported, got --host {known.host}")
    if kind == "aserve":
        cmd = [sys.executable, "-m", "aserve", "serve", *extra]
    elif kind == "llamacpp":
        cmd = extra  # the binary's path, then its arguments
    else:
        cmd = [sys.executable, str(BENCH_DIR / "baseline_server.py"), *extra]
    return cmd, f"http://127.0.0.1:{known.port}"


class Server:
    """A server subprocess: started, waited for (GET /health == 200), stopped (SIGTERM, then kill)."""

    def __init__(self, target: Target, log_path: Path, ready_timeout_s: float) -> None:
        self.target, self.log_path, self.ready_timeout_s = target, log_path, ready_timeout_s
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self) -> Server:
        async with aiohttp.ClientSession() as session:
            try:  # something already listening there would be measured instead of our server
                async with session.get(self.target.url + "/health", timeout=aiohttp.ClientTimeout(total=2)):
                    raise RuntimeError(f"{self.target.url} already answers; stop that server or pick another --port")
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                pass
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
        print(f"[{self.target.name}] starting: {shlex.join(self.target.command or [])}  (log: {self.log_path})",
              file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.target.command, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=BENCH_DIR.parent)
        log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with status {self.proc.returncode}; see {self.log_path}")
                try:
                    async with session.get(self.target.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {self.ready_timeout_s:g}s; see {self.log_path}")
                await asyncio.sleep(0.5)
        print(f"[{self.target.name}] ready at {self.target.url}", file=sys.stderr, flush=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------
async def sweep_target(target: Target, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    largs = argparse.Namespace(**vars(args))
    largs.url = target.url
    largs.extra_body = target.extra_body
    total = args.warmup + sum(load.level_requests(n, args.requests) for n in args.concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=target.force_close)  # no pool cap, as load.py
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        target.model = args.model or await load.discover_model(session, target.url)
        with tqdm(total=total, desc=f"{target.name} warm-up", unit="req", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            errors = 0

            def on_result(r: load.RequestResult) -> None:
                nonlocal errors
                errors += 0 if r.ok else 1
                bar.update(1)
                bar.set_postfix(err=errors, refresh=False)

            await load.warm_up(session, largs, target.model)
            bar.update(args.warmup)
            for n in args.concurrency:
                bar.set_description(f"{target.name} conc={n}")
                target.levels.append(await load.run_level(n, largs, target.model, session, on_result))


def measure_ceiling(target: Target, batches: list[int], log_dir: Path) -> None:
    """The model runner alone (bench/runner_ceiling.py ARGS) at this sweep's concurrencies,
    run before any server starts so that nothing else shares the CPU."""
    out = log_dir / f"ceiling-{target.name}.json"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH_DIR / "runner_ceiling.py"), "--batch", *map(str, batches), "--context", "128",
           "--json", str(out), *shlex.split(target.ceiling_args or "")]
    print(f"[{target.name}] ceiling: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=BENCH_DIR.parent, stdout=subprocess.DEVNULL)
    target.ceiling = {p["batch"]: p["tokens_per_s"] for p in orjson.loads(out.read_bytes())}


async def run(args: argparse.Namespace, targets: list[Target]) -> None:
    for target in targets:
        if target.ceiling_args is None:
            continue
        try:
            measure_ceiling(target, args.concurrency, Path(args.server_log_dir))
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:  # the servers can still be measured
            print(f"[{target.name}] ceiling failed, column left empty: {exc}", file=sys.stderr, flush=True)
    for target in targets:
        try:
            if target.command:
                log_path = Path(args.server_log_dir) / f"server-{target.name}.log"
                async with Server(target, log_path, args.ready_timeout):
                    await sweep_target(target, args)
            else:
                await sweep_target(target, args)
        except (RuntimeError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            target.error = load.describe_error(exc)
            print(f"[{target.name}] failed: {target.error}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def format_results(targets: list[Target]) -> str:
    header = (f"{'target':<10} {'conc':>4} {'reqs':>5} {'err':>4} {'out_tok/s':>10} {'req/s':>7} "
              f"{'ttft_p50':>9} {'ttft_p95':>9} {'ttft_p99':>9} {'itl_p50':>8} {'itl_p95':>8} {'itl_p99':>8} "
              f"{'hlth_p99':>9} {'ceiling':>8}")
    lines = [header, "-" * len(header)]
    for t in targets:
        if t.error and not t.levels:
            lines.append(f"{t.name:<10} failed: {t.error}")
        for lv in t.levels:
            lines.append(
                f"{t.name:<10} {lv.concurrency:>4} {lv.requests:>5} {lv.errors:>4} {lv.output_tokens_per_s:>10.1f} "
                f"{lv.requests_per_s:>7.2f} {load.fmt(lv.ttft_ms.p50):>9} {load.fmt(lv.ttft_ms.p95):>9} "
                f"{load.fmt(lv.ttft_ms.p99):>9} "
                f"{load.fmt(lv.itl_ms.p50, 2):>8} {load.fmt(lv.itl_ms.p95, 2):>8} {load.fmt(lv.itl_ms.p99, 2):>8} "
                f"{load.fmt(lv.health_ms.p99, 2):>9} {_ceiling_share(t, lv):>8}")
    lines.append("(latencies in ms; ttft = sent -> first content chunk; itl = per-token gap between content "
                 "chunks; hlth = GET /health during the level; ceiling = out_tok/s / the model runner's "
                 "decode tokens/s at batch = conc, context 128)")
    notes = []
    for t in targets:
        text = load.format_notes(t.levels)
        if text:
            notes.append(f"[{t.name}]\n" + text)
    return "\n".join(lines + notes)


def _ceiling_share(target: Target, level: load.LevelResult) -> str:
    ceiling = target.ceiling.get(level.concurrency)
    return f"{level.output_tokens_per_s / ceiling:.0%}" if ceiling else "-"


def compute_ratios(targets: list[Target], baseline: str) -> dict[str, list[dict[str, Any]]]:
    """{target: [{concurrency, metric: target/baseline, ...}]} for levels both ran."""
    base = next((t for t in targets if t.name == baseline), None)
    if base is None:
        return {}
    base_levels = {lv.concurrency: lv for lv in base.levels}
    out: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        if t is base:
            continue
        rows = []
        for lv in t.levels:
            b = base_levels.get(lv.concurrency)
            if b is None:
                continue
            row: dict[str, Any] = {"concurrency": lv.concurrency}
            for label, get, _ in RATIO_METRICS:
                num, den = get(lv), get(b)
                row[label] = num / den if num is not None and den else None
            rows.append(row)
        out[t.name] = rows
    return out


def format_ratios(ratios: dict[str, list[dict[str, Any]]], baseline: str) -> str:
    if not ratios:
        return ""
    header = f"{'target':<10} {'conc':>4} " + " ".join(f"{label:>10}" for label, _, _ in RATIO_METRICS)
    lines = [f"ratio to '{baseline}' (target / {baseline}; throughput: higher is better, latency: lower is better)",
             header, "-" * len(header)]
    for name, rows in ratios.items():
        for row in rows:
            cells = " ".join(f"{('-' if row[label] is None else f'{row[label]:.2f}x'):>10}"
                             for label, _, _ in RATIO_METRICS)
            lines.append(f"{name:<10} {row['concurrency']:>4} {cells}")
    return "\n".join(lines)


def write_plot(path: str, targets: list[Target], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), layout="constrained")
    levels = sorted({lv.concurrency for t in targets for lv in t.levels})
    panels = (
        (axes[0], "output tokens/s (aggregate)", False, (("", lambda lv: lv.output_tokens_per_s, "-"),)),
        (axes[1], "TTFT (ms)", True, (("p50", lambda lv: lv.ttft_ms.p50, "-"), ("p95", lambda lv: lv.ttft_ms.p95, "--"))),
        (axes[2], "ITL per token (ms)", True, (("p50", lambda lv: lv.itl_ms.p50, "-"), ("p95", lambda lv: lv.itl_ms.p95, "--"))),
    )
    for ax, title, log_y, series in panels:
        for i, t in enumerate(targets):
            color = f"C{i}"
            for label, get, style in series:
                pts = [(lv.concurrency, get(lv)) for lv in t.levels if get(lv) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o", color=color, label=f"{t.name} {label}".strip())
        ax.set_title(title)
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.minorticks_off()
        if log_y:  # latencies span decades once a server saturates; plain numbers, not 3x10^1
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    model = next((t.model for t in targets if t.model), "?")
    fig.suptitle(f"{model}: max_tokens={args.max_tokens}, temperature={args.temperature:g}, "
                 f"requests/level={args.requests or 'max(2N, 8)'}   ({platform.node()}, {os.cpu_count()} CPUs)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(args: argparse.Namespace, targets: list[Target], ratios: dict, started_at: str) -> dict[str, Any]:
    return {
        "started_at": started_at,
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("concurrency", "requests", "max_tokens", "temperature",
                                                   "warmup", "request_timeout", "health_interval_ms")},
        "baseline": args.baseline,
        "targets": [{"name": t.name, "url": t.url, "command": t.command, "model": t.model, "error": t.error,
                     "ceiling_tokens_per_s": {str(batch): rate for batch, rate in t.ceiling.items()},
                     "levels": [asdict(lv) for lv in t.levels]} for t in targets],
        "ratios": ratios,
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Target]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                   help="a running server to measure (repeatable; measured in the order given)")
    p.add_argument("--start-aserve", metavar="ARGS", default=None,
                   help="start `aserve serve ARGS` as target 'aserve' (port from --port, default 8000)")
    p.add_argument("--start-aserve-as", action="append", default=[], metavar="NAME=ARGS",
                   help="start `aserve serve ARGS` as target NAME (repeatable: compare configurations in one run)")
    p.add_argument("--ceiling", action="append", default=[], metavar="NAME=ARGS",
                   help="measure the model runner alone (bench/runner_ceiling.py ARGS, context 128) at each "
                        "concurrency as batch size, and report target NAME's out_tok/s as a fraction of it")
    p.add_argument("--start-baseline", metavar="ARGS", default=None,
                   help="start `bench/baseline_server.py ARGS` as target 'baseline' (default port 8001)")
    p.add_argument("--start-llamacpp", metavar="PATH ARGS", default=None,
                   help="start llama.cpp's server (binary PATH, then its arguments) as target 'llama.cpp' "
                        "(default port 8080); requests to it carry cache_prompt: false")
    p.add_argument("--baseline", metavar="NAME", default=None,
                   help="target the others are divided by (default: 'baseline' if present, else the first)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64], metavar="N")
    load.add_request_arguments(p)
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds a started server may take to answer /health (default 600)")
    p.add_argument("--server-log-dir", default=str(BENCH_DIR / "results"),
                   help="where started servers' output goes (default bench/results)")
    p.add_argument("--json", metavar="PATH", default=None)
    p.add_argument("--plot", metavar="PATH", default=None, help="PNG: throughput, TTFT, ITL vs concurrency")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.concurrency) or args.requests < 0 or args.max_tokens < 1 or args.warmup < 0:
        p.error("--concurrency/--max-tokens must be >= 1, --requests/--warmup >= 0")
    targets: list[Target] = []
    for spec in args.target:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith("http"):
            p.error(f"--target {spec!r}: expected NAME=http://HOST:PORT")
        targets.append(Target(name, url.rstrip("/")))
    starts = [("aserve", "aserve", args.start_aserve)]
    for spec in args.start_aserve_as:
        name, sep, arg_string = spec.partition("=")
        if not sep or not name:
            p.error(f"--start-aserve-as {spec!r}: expected NAME=ARGS")
        starts.append((name, "aserve", arg_string))
    for name, kind, arg_string in starts + [("llama.cpp", "llamacpp", args.start_llamacpp),
                                            ("baseline", "baseline", args.start_baseline)]:
        if arg_string is not None:
            cmd, url = start_command(kind, arg_string)
            targets.append(Target(name, url, cmd, extra_body=EXTRA_BODY.get(kind, {}), force_close=kind == "llamacpp"))
    names = [t.name for t in targets]
    if not targets:
        p.error("give at least one --target NAME=URL or --start-aserve/--start-baseline")
    if len(set(names)) != len(names):
        p.error(f"target names must be unique: {names}")
    by_name = {t.name: t for t in targets}
    for spec in args.ceiling:
        name, _, ceiling_args = spec.partition("=")
        if name not in by_name:
            p.error(f"--ceiling {spec!r}: NAME must be one of {names}")
        by_name[name].ceiling_args = ceiling_args
    if args.baseline is None:
        args.baseline = "baseline" if "baseline" in names else names[0]
    elif args.baseline not in names:
        p.error(f"--baseline {args.baseline!r} is not one of {names}")
    return args, targets


def main(argv: list[str] | None = None) -> int:
    args, targets = parse_args(argv)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        asyncio.run(run(args, targets))
    except KeyboardInterrupt:
        print("interrupted; reporting what finished", file=sys.stderr)
    print(format_results(targets))
    ratios = compute_ratios(targets, args.baseline)
    text = format_ratios(ratios, args.baseline)
    if text:
        print("\n" + text)
    for path in (args.json, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(to_json(args, targets, ratios, started_at), option=orjson.OPT_INDENT_2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot and any(t.levels for t in targets):
        write_plot(args.plot, targets, args)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(t.error or any(lv.errors for lv in t.levels) for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
