"""Prometheus metrics, named like vLLM's under an `aserve:` prefix, and those vLLM has also
under its own `vllm:` names (README lists them): routers, autoscalers and dashboards written
for vLLM (the Gateway API Inference Extension, KServe, the production-stack router) read those.

One registry per server (not prometheus_client's global one), so several servers in one
process, as in the tests, keep their own counts. The engine reports through the
EngineObserver methods below from the event-loop thread; gauges that describe the engine's
state now (running, waiting, KV usage) are read from it at scrape time.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                    80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self.running = Gauge("aserve:num_requests_running", "Requests in the running batch", **labels)
        self.waiting = Gauge("aserve:num_requests_waiting", "Requests queued for admission", **labels)
        self.kv_usage = Gauge("aserve:kv_cache_usage_perc", "Fraction of KV-cache blocks referenced by requests (0-1)",
                              **labels)
        self.kv_blocks = Gauge("aserve:kv_cache_blocks", "KV-cache blocks: total, free (unreferenced, cached ones "
                               "included) and cached (holding a named prefix)",
                               labelnames=["model_name", "state"], registry=self.registry)
        # Counted by the engine, copied in at scrape time (see render).
        self.prefix_queries = Counter("aserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      **labels)
        self.prefix_hits = Counter("aserve:prefix_cache_hits", "Prompt tokens found in the prefix cache", **labels)
        self.preemptions = Counter("aserve:num_preemptions", "Sequences preempted for want of KV blocks", **labels)
        self.faults = Counter("aserve:engine_faults", "Faults the step loop survived, by stage (engine_loop.py)",
                              labelnames=["model_name", "stage"], registry=self.registry)
        self._engine_counts: dict[str, int] = {}
        # LoRA: ours per adapter, and vLLM's info gauge in the form the Gateway API Inference
        # Extension reads (adapter names comma-joined in labels, the value a timestamp).
        self.lora_running = Gauge("aserve:lora_requests_running", "Running requests per LoRA adapter",
                                  labelnames=["model_name", "lora_name"], registry=self.registry)
        self.lora_waiting = Gauge("aserve:lora_requests_waiting", "Waiting requests per LoRA adapter",
                                  labelnames=["model_name", "lora_name"], registry=self.registry)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters (vLLM's)",
                               labelnames=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                               registry=self.registry)
        self.prompt_tokens = Counter("aserve:prompt_tokens", "Prompt tokens admitted", **labels)
        self.generation_tokens = Counter("aserve:generation_tokens", "Tokens generated", **labels)
        self.success = Counter("aserve:request_success", "Requests that finished, by finish reason",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.errors = Counter("aserve:request_errors",
                              "Requests answered with an error (a response or a stream's error event), by type, "
                              "status and code", labelnames=["model_name", "error_type", "status", "code"],
                              registry=self.registry)
        self.ttft = Histogram("aserve:time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, **labels)
        self.itl = Histogram("aserve:inter_token_latency_seconds", "Gap between a request's successive tokens",
                             buckets=_TOKEN_GAP_BUCKETS, **labels)
        self.e2e = Histogram("aserve:e2e_request_latency_seconds", "Arrival to the last token",
                             buckets=_LATENCY_BUCKETS, **labels)
        self.queue = Histogram("aserve:request_queue_time_seconds", "Arrival to admission into the batch",
                               buckets=_LATENCY_BUCKETS, **labels)
        self.step = Histogram("aserve:engine_step_seconds", "Duration of one engine step (batched forward)",
                              buckets=_TOKEN_GAP_BUCKETS, **labels)
        self.batch = Histogram("aserve:engine_step_batch_size", "Sequences in one engine step",
                               buckets=_BATCH_BUCKETS, **labels)
        self._model = model_name
        # The same families again under vLLM's names (always: two names cost a few lines of text).
        self.registry.register(_Renamed([self.running, self.waiting, self.kv_usage, self.prefix_queries,
                                          self.prefix_hits, self.preemptions, self.prompt_tokens,
                                          self.generation_tokens, self.success, self.ttft, self.itl, self.e2e,
                                          self.queue], "aserve:", "vllm:"))

    # ---- EngineObserver ----

    def on_admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        self.queue.labels(self._model).observe(queue_seconds)
        self.prompt_tokens.labels(self._model).inc(prompt_tokens)

    def on_step(self, seconds: float, batch_size: int) -> None:
        self.step.labels(self._model).observe(seconds)
        self.batch.labels(self._model).observe(batch_size)

    def on_token(self, first: bool, seconds: float) -> None:
        """`seconds`: since arrival for the first token, since the previous token otherwise."""
        self.generation_tokens.labels(self._model).inc()
        (self.ttft if first else self.itl).labels(self._model).observe(seconds)

    def on_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        self.success.labels(self._model, finish_reason).inc()
        self.e2e.labels(self._model).observe(e2e_seconds)

    # ---- HTTP side ----

    def on_error(self, error_type: str, status: int, code: str | None) -> None:
        self.errors.labels(self._model, error_type, str(status), code or "").inc()

    def render(self, stats: dict[str, int], lora: tuple[dict[str, int], dict[str, int]] | None = None,
               max_loras: int = 0, faults: dict[str, int] | None = None) -> bytes:
        self.running.labels(self._model).set(stats["running"])
        self.waiting.labels(self._model).set(stats["waiting"])
        total = stats["kv_blocks_total"]
        self.kv_usage.labels(self._model).set((total - stats["kv_blocks_free"]) / total if total else 0.0)
        for state in ("total", "free", "cached"):
            self.kv_blocks.labels(self._model, state).set(stats[f"kv_blocks_{state}"])
        for counter, key in ((self.prefix_queries, "prefix_cache_queries"), (self.prefix_hits, "prefix_cache_hits"),
                             (self.preemptions, "preemptions")):
            self._catch_up(counter.labels(self._model), key, stats[key])
        for stage, count in (faults or {}).items():
            self._catch_up(self.faults.labels(self._model, stage), f"fault:{stage}", count)
        if lora is not None:
            running, waiting = lora
            for gauge, table in ((self.lora_running, running), (self.lora_waiting, waiting)):
                gauge.clear()  # adapters that left would otherwise keep their last count
                for name, count in table.items():
                    gauge.labels(self._model, name).set(count)
            self.lora_info.clear()
            self.lora_info.labels(",".join(sorted(running)), ",".join(sorted(waiting)),
                                  str(max_loras)).set_to_current_time()
        return generate_latest(self.registry)

    def _catch_up(self, counter: Counter, key: str, count: int) -> None:
        """Advances a counter to an engine-side count (counters only go up: by the difference)."""
        counter.inc(max(count - self._engine_counts.get(key, 0), 0))
        self._engine_counts[key] = count


class _Renamed:
    """A collector that yields other collectors' families under another prefix."""

    def __init__(self, collectors: list, old: str, new: str) -> None:
        self.collectors, self.old, self.new = collectors, old, new

    def collect(self):
        for collector in self.collectors:
            for family in collector.collect():
                family.name = self.new + family.name.removeprefix(self.old)
                family.samples = [s._replace(name=self.new + s.name.removeprefix(self.old)) for s in family.samples]
                yield family
