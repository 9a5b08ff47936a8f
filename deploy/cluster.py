#!/usr/bin/env python
"""N aserve replicas on loopback behind vllm-router: `make cluster` (Ctrl-C stops them all).

    python deploy/cluster.py --replicas 3 --policy cache_aware --port 8080 -- --max-num-seqs 64

Replicas listen on the ports after the router's (8081, 8082, ...), share one model cache (the
first to start downloads and converts while the others wait on its lock) and split the CPU
cores between them. The router's health checks run every second, so a replica that dies or
drains leaves the rotation within about two seconds. Arguments after `--` go to every
`aserve serve`. bench/scale_out.py and tests/test_cluster.py drive the same `Cluster`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROUTER_VERSION = "0.1.17"  # pinned as in constraints.txt: the router the tests and figures used
POLICIES = ("cache_aware", "consistent_hash", "power_of_two", "round_robin")
REPO_ROOT = Path(__file__).resolve().parents[1]
# How the router watches replicas: every second, out after two failed checks, back after one good one.
# Its defaults (60 s, 3 and 2) would keep sending to a dead or draining replica for minutes; the
# startup-check interval is also how often power_of_two polls each replica's GET /get_load.
ROUTER_HEALTH_ARGS = ("--health-check-interval-secs", "1", "--health-failure-threshold", "2",
                      "--health-success-threshold", "1", "--health-check-timeout-secs", "3",
                      "--worker-startup-check-interval", "1")
# cache_aware leaves prefix affinity for the least-loaded replica once loads are this many requests
# apart (and 1.5x). Its default, 64, suits GPU replicas running hundreds of sequences; a CPU replica
# here runs a few dozen, and 16 sessions sharing a system prompt all piled onto one replica
# (bench/scale_out.py affinity, back to back: first-turn TTFT p50 16.5 s at 64, 8.3 s at 4).
ROUTER_BALANCE_ARGS = ("--balance-abs-threshold", "4")


class ClusterError(RuntimeError):
    """A replica or the router did not start; the message holds the end of its log."""


@dataclass
class Process:
    """One child process with its output in a log file, started in its own session so that a
    Ctrl-C in the terminal reaches only this script, which stops the children in order."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.running:
            raise ClusterError(f"{self.name} is already running")
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._log is not None:
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (what a crash or an OOM kill looks like)."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class Replica(Process):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _get(url: str, timeout: float = 2.0) -> int:
    """The status of GET url (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def wait_until_ready(process: Process, url: str, timeout: float) -> None:
    """Polls `url` until it answers 200; fails early, with its log, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise ClusterError(f"{process.name} exited with code {process.proc.returncode if process.proc else None}:\n"
                               f"{process.log_tail()}")
        if _get(url) == 200:
            return
        time.sleep(0.2)
    raise ClusterError(f"{process.name} was not ready at {url} within {timeout:.0f} s:\n{process.log_tail()}")


def router_executable() -> str:
    # The router installed beside this Python (make setup puts it in .venv), else one on PATH.
    beside = Path(sys.executable).parent / "vllm-router"
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if found is None:
        raise ClusterError(f"vllm-router is not installed: pip install vllm-router=={ROUTER_VERSION} "
                           "(make setup installs it)")
    return found


def router(policy: str, port: int, worker_urls: list[str], metrics_port: int, log_path: Path,
           extra_args: list[str] | tuple[str, ...] = ()) -> Process:
    """vllm-router on 127.0.0.1:`port` in front of `worker_urls` (not started)."""
    return Process(f"vllm-router {policy} (:{port})",
                   [router_executable(), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                    "--worker-urls", *worker_urls, "--prometheus-port", str(metrics_port),
                    *ROUTER_HEALTH_ARGS, *ROUTER_BALANCE_ARGS, *extra_args],
                   log_path, dict(os.environ))


def start_router(process: Process, port: int) -> None:
    process.start()
    wait_until_ready(process, f"http://127.0.0.1:{port}/health", 60)


class Cluster:
    """`replicas` aserve processes and vllm-router in front, all on 127.0.0.1.

    Used as a context manager: entering starts everything and waits until the router answers;
    leaving stops the router, then drains the replicas with SIGTERM (SIGKILL after `stop_timeout`).
    """

    def __init__(self, replicas: int = 3, policy: str = "cache_aware", port: int = 8080,
                 serve_args: list[str] | tuple[str, ...] = (), router_args: list[str] | tuple[str, ...] = (),
                 log_dir: Path | None = None, threads_per_replica: int | None = None,
                 replica_ports: list[int] | None = None, metrics_port: int | None = None,
                 start_timeout: float = 600.0, stop_timeout: float = 30.0) -> None:
        if policy not in POLICIES:
            raise ClusterError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if replicas < 1:
            raise ClusterError("at least one replica")
        self.port, self.policy = port, policy
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="aserve-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        ports = replica_ports or [port + 1 + i for i in range(replicas)]
        # On one machine the replicas share its cores: each gets its part, so together they do not
        # oversubscribe it (on separate machines or GPUs each would take its own).
        threads = threads_per_replica or max(1, (os.cpu_count() or 1) // replicas)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.replicas = [
            Replica(f"replica {i} (:{p})",
                    [sys.executable, "-m", "aserve", "serve", "--host", "127.0.0.1", "--port", str(p),
                     "--num-threads", str(threads), *serve_args],
                    self.log_dir / f"replica-{i}.log", env, port=p)
            for i, p in enumerate(ports[:replicas])]
        self.metrics_port = metrics_port or port + replicas + 1
        self.router = router(policy, port, [r.url for r in self.replicas], self.metrics_port,
                             self.log_dir / "router.log", router_args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                wait_until_ready(replica, replica.url + "/health", self.start_timeout)
            start_router(self.router, self.port)
        except BaseException:
            self.stop()
            raise

    def restart(self, index: int) -> None:
        """Starts a replica that was killed or stopped again, on its port, and waits until it is ready."""
        replica = self.replicas[index]
        replica.start()
        wait_until_ready(replica, replica.url + "/health", self.start_timeout)

    def stop(self) -> None:
        self.router.signal(signal.SIGTERM)
        if self.router.wait(10) is None:
            self.router.kill()
        for replica in self.replicas:
            replica.signal(signal.SIGTERM)  # each drains: its running requests finish
        for replica in self.replicas:
            if replica.wait(self.stop_timeout) is None:
                replica.kill()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--policy", choices=POLICIES, default="cache_aware")
    parser.add_argument("--port", type=int, default=8080, help="the router's port; replicas take the next ones")
    parser.add_argument("--log-dir", type=Path, default=None, help="where each process logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    cluster = Cluster(args.replicas, args.policy, args.port, serve_args, log_dir=args.log_dir)
    stop = False

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # while starting: start() stops what it started, then we leave

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupt)  # SIGINT raises KeyboardInterrupt already
    print(f"starting {args.replicas} replicas and vllm-router {ROUTER_VERSION} ({args.policy}); logs in "
          f"{cluster.log_dir}", flush=True)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cluster: interrupted while starting; everything started is stopped", file=sys.stderr)
        return 130
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"router at {cluster.url}  (replicas: {', '.join(r.url for r in cluster.replicas)}; router metrics: "
          f"http://127.0.0.1:{cluster.metrics_port}/metrics); Ctrl-C stops everything", flush=True)
    try:
        while not stop:
            if not cluster.router.running:
                print(f"cluster: the router exited:\n{cluster.router.log_tail()}", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        print("stopping: the router, then the replicas (each drains its running requests)", flush=True)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
