"""Prometheus metrics: base units (seconds), `_total` counters, every name prefixed `halfstep_`.

One CollectorRegistry per app, so tests can build many apps in one process; one worker
process per GPU means multiprocess mode is not needed. No per-request labels (seed, id); the
`bundle` label is a served bundle's configured name (bounded by the configuration).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# From 1 ms (a few-step student at batch 1) to 30 s (the teacher at many steps, queued): the
# Prometheus defaults (5 ms .. 10 s) miss both ends.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Reasons a request ends without an image (the labels of halfstep_rejected_total); each is the
# reason of one entry of errors.REJECTIONS.
REJECT_REASONS = ("invalid", "unauthorized", "queue_full", "overloaded", "deadline",
                  "cancelled", "draining", "not_ready", "unhealthy", "error")
# Results of a bundle reload (the result label of halfstep_reloads_total; reload.Outcome.result).
RELOAD_RESULTS = ("swapped", "unchanged", "refused")


class Metrics:
    """Every halfstep metric, registered in its own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "halfstep_request_duration_seconds",
            "Time from a /generate request's arrival to its response, by bundle, model, lane "
            "(steps: the student's step count, or teacher) and HTTP status",
            ["bundle", "model", "steps", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "halfstep_queue_wait_seconds", "Time a request waited in the queue before its batch",
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "halfstep_batch_size", "Images per executed batch (before padding to a bucket)",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_duration = Histogram(
            "halfstep_batch_duration_seconds", "Engine time per executed batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "halfstep_queue_depth", "Requests waiting in the queue", registry=r,
        )
        self.requests = Counter(
            "halfstep_requests", "Finished /generate requests by HTTP status", ["status"],
            registry=r,
        )
        self.rejected = Counter(
            "halfstep_rejected", "Requests refused or dropped without an image, by reason",
            ["reason"], registry=r,
        )
        self.images = Counter(
            "halfstep_images_generated", "Images returned to clients, by bundle and model",
            ["bundle", "model"],
            registry=r,
        )
        self.ready = Gauge(
            "halfstep_ready", "1 when warmed up and accepting work, else 0", registry=r,
        )
        self.lane_queue_depth = Gauge(
            "halfstep_lane_queue_depth",
            "Requests waiting, by bundle and lane (student steps or teacher)",
            ["bundle", "lane"], registry=r,
        )
        self.lane_backlog = Gauge(
            "halfstep_lane_backlog_seconds",
            "Predicted engine seconds of the requests waiting, by bundle and lane",
            ["bundle", "lane"], registry=r,
        )
        self.engine_busy = Counter(
            "halfstep_engine_busy_seconds", "Seconds the engine spent running batches",
            registry=r,
        )
        self.engine_busy_fraction = Gauge(
            "halfstep_engine_busy_fraction",
            "Share of the last few seconds (set after each batch) the engine was running",
            registry=r,
        )
        self.padded_rows = Counter(
            "halfstep_padded_rows", "Padding rows the engine ran beyond the requested images, "
            "by bundle and lane", ["bundle", "lane"], registry=r,
        )
        self.batch_predicted = Gauge(
            "halfstep_lane_batch_predicted_seconds",
            "Predicted engine time of the lane's last batch", ["bundle", "lane"],
            registry=r,
        )
        self.batch_actual = Gauge(
            "halfstep_lane_batch_seconds", "Measured engine time of the lane's last batch",
            ["bundle", "lane"], registry=r,
        )
        self.reloads = Counter(
            "halfstep_reloads", "Bundle reloads by bundle and result (swapped: new weights "
            "serving; unchanged; refused: the old ones keep serving)", ["bundle", "result"],
            registry=r,
        )
        self.generation = Gauge(
            "halfstep_bundle_generation",
            "Weights generation each bundle serves: 1 at start, +1 per reload that swapped it",
            ["bundle"], registry=r,
        )
        for reason in REJECT_REASONS:  # export zeros so rate() works from the first scrape
            self.rejected.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
