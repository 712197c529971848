"""Prometheus metrics (prometheus-client), one registry per app so tests can run several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ExpertStoreCollector:
    """Reads the expert store's counters at scrape time."""

    def __init__(self, app_state):
        self.state = app_state

    def collect(self):
        worker = self.state.worker
        if worker is None:
            return
        store = worker.model.engine.store
        stats = store.stats
        for name, value, help_text in (
            ("edgemoe_expert_loads", stats.loads, "Expert sessions created"),
            ("edgemoe_expert_hits", stats.hits, "Expert requests served by a resident expert"),
            ("edgemoe_expert_misses", stats.misses, "Expert requests that had to load the expert"),
            ("edgemoe_expert_evictions", stats.evictions, "Experts evicted to stay within the budget"),
            ("edgemoe_expert_bytes_read", stats.bytes_read, "Expert bytes read from storage"),
            ("edgemoe_expert_stall_seconds", stats.stall_seconds, "Seconds generation waited for experts"),
            ("edgemoe_expert_load_seconds", stats.load_seconds, "Seconds spent creating expert sessions"),
            ("edgemoe_expert_preloads", stats.preloads, "Experts loaded ahead by the I/O thread"),
            ("edgemoe_expert_preloads_used", stats.preloads_used, "Preloaded experts requested before eviction"),
            ("edgemoe_expert_inflight_hits", stats.inflight_hits,
             "Expert requests that waited for a preload already in flight"),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        recall = GaugeMetricFamily("edgemoe_predictor_recall",
                                   "Fraction of chosen experts that each predictor had predicted",
                                   labels=["predictor", "layer"])
        for predictor, summary in worker.model.engine.recall().items():
            if summary["overall"] is not None:
                recall.add_metric([predictor, "all"], summary["overall"])
            for layer, value in enumerate(summary["per_layer"]):
                if value is not None:
                    recall.add_metric([predictor, str(layer)], value)
        yield recall
        yield GaugeMetricFamily("edgemoe_expert_resident_bytes", "Bytes of experts held now",
                                value=store.resident_bytes)
        yield GaugeMetricFamily("edgemoe_expert_budget_bytes", "Expert budget in bytes", value=store.budget_bytes)


class ServerMetrics:
    def __init__(self, app_state):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgemoe_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("edgemoe_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("edgemoe_generated_tokens", "Tokens generated", registry=self.registry)
        self.generations = Counter("edgemoe_generations", "Finished generations by finish reason",
                                   ["finish_reason"], registry=self.registry)
        self.time_to_first_token = Histogram("edgemoe_time_to_first_token_seconds",
                                             "Seconds from request to first generated token",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_per_token = Histogram("edgemoe_time_per_output_token_seconds",
                                        "Seconds between generated tokens", buckets=_LATENCY_BUCKETS,
                                        registry=self.registry)
        self.queue_length = Gauge("edgemoe_queue_length", "Requests waiting for the generation worker",
                                  registry=self.registry)
        self.queue_length.set_function(lambda: app_state.worker.waiting if app_state.worker else 0)
        self.registry.register(ExpertStoreCollector(app_state))
