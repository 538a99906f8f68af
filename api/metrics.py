"""Prometheus metrics, in a registry per app (so test apps and reloads never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from verity.api import connection_balance
from verity.api.alert_delivery import alert_attempts
from verity.api.drift_monitor import DriftMonitor
from verity.api.shadow import shadow_outcomes

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ModelCollector:
    """Reads the registry at scrape time: which versions are loaded, which is default, queue depths."""

    def __init__(self, describe: Callable[[], list[tuple[str, str, str, bool, int]]]) -> None:
        self.describe = describe

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        info = GaugeMetricFamily(
            "verity_model_info",
            "Loaded model versions (1 = default for its modality).",
            labels=["modality", "name", "version"],
        )
        depth = GaugeMetricFamily(
            "verity_queue_depth", "Requests waiting in a model's batch queue.", labels=["name", "version"]
        )
        for modality, name, version, is_default, queued in self.describe():
            info.add_metric([modality, name, version], 1.0 if is_default else 0.0)
            depth.add_metric([name, version], float(queued))
        yield info
        yield depth


class _ConnectionCollector:
    """The workers' connections from the table they share (api/connection_balance.py), read at scrape
    time: whichever worker answers the scrape reports every worker, so one scrape shows the balance."""

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        balancer = connection_balance.current()
        if balancer is None:
            return
        held = GaugeMetricFamily(
            "verity_worker_connections", "Connections each worker process holds.", labels=["worker"]
        )
        handed = CounterMetricFamily(
            "verity_connections_handed",
            "Connections a worker accepted and handed to one holding fewer (out), or was handed (in).",
            labels=["worker", "direction"],
        )
        for pid, connections, handed_out, handed_in in balancer.table.workers():
            held.add_metric([str(pid)], float(connections))
            handed.add_metric([str(pid), "out"], float(handed_out))
            handed.add_metric([str(pid), "in"], float(handed_in))
        yield held
        yield handed


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._add_http_metrics()
        self._add_scoring_metrics()
        self.alert_attempts = alert_attempts(self.registry)
        self.drift = DriftMonitor(self.registry)
        self.shadow = shadow_outcomes(self.registry)
        self.registry.register(_ConnectionCollector())

    def _add_http_metrics(self) -> None:
        """Requests as HTTP sees them: counts, latency, those in flight, and those refused (503, 429, 408)."""
        self.requests = Counter(
            "verity_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "verity_request_latency_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "verity_rejected_total",
            "Requests refused with 503, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "verity_rate_limited_total",
            "Requests refused with 429, by reason (requests: the key's rate; decodes: its decode share) "
            "and key id (anonymous: callers without a key).",
            ["reason", "key"],
            registry=self.registry,
        )
        self.timed_out = Counter(
            "verity_request_timeouts_total",
            "Requests cut off with 408 because their body did not arrive in time.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "verity_requests_in_flight", "HTTP requests being served.", registry=self.registry
        )

    def _add_scoring_metrics(self) -> None:
        """What scoring did: verdicts, the model's latency and batch sizes, and audit writes that failed."""
        self.predictions = Counter(
            "verity_predictions_total",
            "Verdicts given, by modality, verdict and model.",
            ["modality", "verdict", "model_version"],
            registry=self.registry,
        )
        self.inference_latency = Histogram(
            "verity_inference_latency_seconds",
            "Time from a decoded image to its score (queue wait included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "verity_batch_size",
            "Images per model run.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "verity_audit_failures_total", "Audit writes that failed.", registry=self.registry
        )

    def watch_models(self, describe: Callable[[], list[tuple[str, str, str, bool, int]]]) -> None:
        self.registry.register(_ModelCollector(describe))

    def render(self) -> bytes:
        return generate_latest(self.registry)
