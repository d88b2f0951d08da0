"""``pe-node status``: what the node holds and is doing, from the database alone (works beside a running node)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from pe_node.db import (
    AssociationRecord,
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    Series,
    Study,
)


def collect(db: Database, *, limit: int = 200, audit: bool = False) -> dict[str, Any]:
    """The status report (DESIGN.md "Command line"): recent series, jobs and deliveries, with counts."""
    with db.session() as session:
        series = session.scalars(select(Series).order_by(Series.last_received_at.desc()).limit(limit)).all()
        counts = dict(session.execute(
            select(Instance.series_id, func.count()).where(Instance.series_id.in_([s.id for s in series]))
            .group_by(Instance.series_id)
        ).all())
        jobs = session.execute(
            select(Job, Series.series_instance_uid, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_id).outerjoin(Series, Series.id == Job.series_id)
            .order_by(Job.id.desc()).limit(limit)
        ).all()
        deliveries = [*session.scalars(
            select(Delivery).where(Delivery.state != DeliveryState.DONE).order_by(Delivery.id.desc()).limit(limit)
        ).all()] + [*session.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.DONE).order_by(Delivery.id.desc()).limit(limit)
        ).all()]
        report: dict[str, Any] = {
            "counts": {
                "series": _counts(session, Series.state),
                "jobs": _counts(session, Job.state),
                "deliveries": _counts(session, Delivery.state),
            },
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "study_instance_uid": s.study_instance_uid,
                    "modality": s.modality,
                    "description": s.series_description,
                    "instances": counts.get(s.id, 0),
                    "state": s.state.value,
                    "reason": s.reason,
                    "first_received_at": _iso(s.first_received_at),
                    "last_received_at": _iso(s.last_received_at),
                    "completed_at": _iso(s.completed_at),
                }
                for s in series
            ],
            "jobs": [
                {
                    "id": job.id,
                    "study_instance_uid": study_uid,
                    "series_instance_uid": series_uid,
                    "state": job.state.value,
                    "attempts": job.attempts,
                    "instances": job.instances,
                    "error": job.error,
                    "created_at": _iso(job.created_at),
                    "started_at": _iso(job.started_at),
                    "finished_at": _iso(job.finished_at),
                    "lease_owner": job.lease_owner,
                    "timings": job.timings or {},
                    "result": job.result,
                }
                for job, series_uid, study_uid in jobs
            ],
            "deliveries": [
                {
                    "job_id": d.job_id,
                    "destination": d.destination,
                    "sop_instance_uid": d.sop_instance_uid,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "error": d.error,
                    "next_attempt_at": _iso(d.next_attempt_at) if d.state == DeliveryState.PENDING else None,
                    "delivered_at": _iso(d.delivered_at),
                }
                for d in deliveries
            ],
        }
        if audit:
            report["associations"] = [
                {
                    "calling_ae_title": a.calling_ae_title,
                    "called_ae_title": a.called_ae_title,
                    "peer": f"{a.peer_host}:{a.peer_port}",
                    "accepted": a.accepted,
                    "reason": a.reason,
                    "started_at": _iso(a.started_at),
                    "ended_at": _iso(a.ended_at),
                    "instances_received": a.instances_received,
                    "instances_failed": a.instances_failed,
                }
                for a in session.scalars(
                    select(AssociationRecord).order_by(AssociationRecord.id.desc()).limit(limit)
                ).all()
            ]
    return report


def _counts(session: Any, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {state.value: count for state, count in rows}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def render(report: dict[str, Any]) -> str:
    """A plain-text view of the report for a terminal."""
    lines = []
    counts = report["counts"]
    for name in ("series", "jobs", "deliveries"):
        summary = ", ".join(f"{state} {n}" for state, n in sorted(counts[name].items())) or "none"
        lines.append(f"{name:<11} {summary}")
    lines.append("")
    lines.append("SERIES")
    for s in report["series"]:
        reason = f"  ({s['reason']})" if s["reason"] else ""
        lines.append(f"  {s['state']:<10} {s['modality'] or '-':<3} {s['instances']:>5}  {s['series_instance_uid']}"
                     f"  last {s['last_received_at']}{reason}")
    lines.append("JOBS")
    for j in report["jobs"]:
        timing = " ".join(f"{k}={v:.2f}s" for k, v in (j["timings"] or {}).items())
        error = f"  error: {j['error']}" if j["error"] else ""
        analysed = j["series_instance_uid"] or "-"
        lines.append(f"  #{j['id']:<5} {j['state']:<8} attempts {j['attempts']}  study {j['study_instance_uid']}"
                     f"  analysed {analysed}  {timing}{error}")
    pending = [d for d in report["deliveries"] if d["state"] != "done"]
    lines.append(f"DELIVERIES ({len(pending)} not delivered)")
    for d in pending:
        lines.append(f"  job {d['job_id']:<5} {d['state']:<8} {d['destination']:<12} attempts {d['attempts']}"
                     f"  {d['sop_instance_uid']}  {d['error'] or ''}")
    if "associations" in report:
        lines.append("ASSOCIATIONS")
        for a in report["associations"]:
            verdict = "accepted" if a["accepted"] else f"REJECTED ({a['reason']})"
            lines.append(f"  {a['started_at']}  {a['calling_ae_title']:<16} {a['peer']:<22} {verdict}"
                         f"  stored {a['instances_received']} failed {a['instances_failed']}")
    return "\n".join(lines)
