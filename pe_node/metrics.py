"""Prometheus metrics of one pe-node process (prometheus-client, served at ``/metrics`` by ``pe_node.web``).

Events are counted where they happen (associations, instances, routing, jobs, deliveries) and latencies observed
per phase: receive to complete (last instance to job queued), queue wait, load, inference, report, delivery (job
done to object stored at the destination). Jobs and deliveries by state, and free disk, are read from the
database and the storage volume when scraped, so every process of a scaled-out node reports the same totals.
Each Metrics owns its registry: nothing is global, and tests can read one in isolation.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pe_node.db import Database, Delivery, DeliveryState, Job, JobState

PHASES = ("receive_to_complete", "queue_wait", "load", "inference", "report", "delivery")
_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.associations = Counter("pe_node_associations", "Association requests by result", ["result"],
                                    registry=self.registry)
        self.instances = Counter("pe_node_instances_received", "C-STORE requests by outcome", ["outcome"],
                                 registry=self.registry)
        self.series = Counter("pe_node_series_completed", "Quiet series by routing decision", ["routing"],
                              registry=self.registry)
        self.jobs_finished = Counter("pe_node_jobs_finished", "Finished jobs by outcome", ["outcome"],
                                     registry=self.registry)
        self.deliveries = Counter("pe_node_deliveries", "Delivery attempts by result", ["result"],
                                  registry=self.registry)
        self.phase = Histogram("pe_node_phase_seconds", "Latency of each phase from a series to its results",
                               ["phase"], buckets=_BUCKETS, registry=self.registry)

    def observe(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
        self.phase.labels(phase=phase).observe(max(0.0, seconds))

    def watch(self, db: Database, storage: Path) -> None:
        """Also report jobs and deliveries by state and free disk, read at each scrape."""
        self.registry.register(_StateCollector(db, storage))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, db: Database, storage: Path) -> None:
        self.db = db
        self.storage = storage

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("pe_node_jobs", "Jobs by state", labels=["state"])
        deliveries = GaugeMetricFamily("pe_node_deliveries_by_state", "Deliveries by state", labels=["state"])
        with self.db.session() as session:
            job_counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            delivery_counts = dict(session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        for job_state in JobState:
            jobs.add_metric([job_state.value], job_counts.get(job_state, 0))
        for delivery_state in DeliveryState:
            deliveries.add_metric([delivery_state.value], delivery_counts.get(delivery_state, 0))
        yield jobs
        yield deliveries
        free = GaugeMetricFamily("pe_node_storage_free_bytes", "Free bytes on the storage volume")
        free.add_metric([], shutil.disk_usage(self.storage).free if self.storage.exists() else 0)
        yield free
