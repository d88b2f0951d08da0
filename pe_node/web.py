"""The node's small read-only web server: a status page, its JSON, Prometheus metrics and a health check.

    /             the status page: recent series, jobs with phase timings and findings, deliveries not yet done,
                  the model in use (refreshes itself every 5 s)
    /api/status   the same as ``pe-node status --json``
    /metrics      Prometheus text format
    /healthz      200 when the database answers (and the receiver listens, in a receiving process), else 503

Nothing here changes state; there are no forms and no POST. It listens on 127.0.0.1 by default: put a reverse
proxy with authentication in front before exposing it, since it shows UIDs and findings (never patient names).
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import text

from pe_node import __version__
from pe_node.config import WebConfig
from pe_node.db import Database
from pe_node.jobs.result import JobResult
from pe_node.metrics import Metrics
from pe_node.status import collect

log = logging.getLogger(__name__)

PAGE_ROWS = 50


class WebServer:
    def __init__(self, config: WebConfig, db: Database, metrics: Metrics, model: dict[str, Any],
                 receiving: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics
        self.model = model
        self.receiving = receiving
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "web server not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        owner = self

        class Handler(_Handler):
            web = owner

        self._server = ThreadingHTTPServer((self.config.host, self.config.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="web", daemon=True)
        self._thread.start()
        log.info("status page, /metrics and /healthz on http://%s:%d/", self.config.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            with self.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if self.receiving is not None:
            checks["receiver"] = "listening" if self.receiving() else "stopped"
        healthy = checks["database"] == "ok" and checks.get("receiver", "listening") == "listening"
        return healthy, {"status": "ok" if healthy else "unhealthy", "version": __version__, **checks}


class _Handler(BaseHTTPRequestHandler):
    web: WebServer
    server_version = f"pe-node/{__version__}"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/":
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", render_page(self._status(), self.web.model))
            elif path == "/api/status":
                self._send(HTTPStatus.OK, "application/json", json.dumps(self._status(), indent=1))
            elif path == "/metrics":
                self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", self.web.metrics.exposition())
            elif path == "/healthz":
                healthy, body = self.web.health()
                self._send(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, "application/json",
                           json.dumps(body))
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", "not found\n")
        except Exception:
            log.exception("web request %s failed", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", "internal error\n")

    def _status(self) -> dict[str, Any]:
        return collect(self.web.db, limit=PAGE_ROWS)

    def _send(self, status: HTTPStatus, content_type: str, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("web: " + format, *args)


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#1d2228;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
.note{color:#8a1c1c;font-weight:600} .muted{color:#667}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0001}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eef1f4;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.uid{font-family:ui-monospace,monospace;font-size:12px}
.state{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:12px;background:#e3e6ea}
.done,.complete,.negative{background:#d8f0dc} .failed,.positive{background:#f7d4d4}
.running,.pending,.receiving,.queued{background:#fdf0c8} .ignored,.not_analysed,.indeterminate{background:#e4e0f5}
.cards{display:flex;gap:1em;flex-wrap:wrap} .card{background:#fff;padding:.6em 1em;box-shadow:0 1px 2px #0001}
.card b{font-size:1.3em;display:block}
"""


def render_page(status: dict[str, Any], model: dict[str, Any]) -> str:
    """The status page as one self-contained HTML document (no scripts, no external resources)."""
    counts = status["counts"]
    cards = "".join(
        f'<div class="card">{html.escape(name)}<b>{sum(counts[name].values())}</b>'
        f'<span class="muted">{_summary(counts[name])}</span></div>'
        for name in ("series", "jobs", "deliveries")
    )
    not_done = [d for d in status["deliveries"] if d["state"] != "done"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>pe-node status</title><style>{_STYLE}</style></head><body>
<h1>pe-node status</h1>
<p class="note">Findings are preliminary and produced by an algorithm: not for diagnostic use.</p>
<div class="cards">{cards}</div>
<h2>Model in use</h2>{_model_table(model)}
<h2>Recent jobs</h2>{_jobs_table(status["jobs"])}
<h2>Deliveries not done ({len(not_done)})</h2>{_deliveries_table(not_done)}
<h2>Recent series</h2>{_series_table(status["series"])}
<p class="muted">pe-node {html.escape(__version__)} &middot; refreshes every 5 s</p>
</body></html>"""


def _summary(counts: dict[str, int]) -> str:
    return html.escape(", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "none")


def _state(value: str | None) -> str:
    value = value or "-"
    return f'<span class="state {html.escape(value)}">{html.escape(value.replace("_", " "))}</span>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<td{cls}>{html.escape('-' if value is None else str(value))}</td>"


def _model_table(model: dict[str, Any]) -> str:
    rows = [[_td(key), _td(value, "uid" if key in ("sha256", "checkpoint") else "")] for key, value in model.items()]
    return _table(["", ""], rows)


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for job in jobs:
        result = JobResult.from_json(job["result"]) if job.get("result") else None
        report = result.primary if result is not None else None
        finding = result.outcome if result is not None else None
        probability = report.pe_probability if report is not None else None
        detail = (report.detail if report is not None else None) or job.get("error") or ""
        timings = " ".join(f"{k} {v:.2f}s" for k, v in (job.get("timings") or {}).items()
                           if k in ("load", "inference", "report", "total"))
        rows.append([
            _td(job["id"], "num"), f"<td>{_state(job['state'])}</td>", _td(job["study_instance_uid"], "uid"),
            _td(job["series_instance_uid"], "uid"),
            f"<td>{_state(finding) if finding else '-'}</td>",
            _td(f"{probability:.3f}" if probability is not None else None, "num"),
            _td(job["attempts"], "num"), _td(timings), _td(detail),
        ])
    return _table(["Job", "State", "Study", "Analysed series", "Finding", "PE probability", "Attempts", "Timings",
                   "Detail"], rows)


def _deliveries_table(deliveries: list[dict[str, Any]]) -> str:
    rows = [[_td(d["job_id"], "num"), _td(d["destination"]), f"<td>{_state(d['state'])}</td>",
             _td(d["attempts"], "num"), _td(d["sop_instance_uid"], "uid"), _td(d["next_attempt_at"]), _td(d["error"])]
            for d in deliveries]
    return _table(["Job", "Destination", "State", "Attempts", "Object", "Next attempt", "Last error"], rows)


def _series_table(series: list[dict[str, Any]]) -> str:
    rows = [[f"<td>{_state(s['state'])}</td>", _td(s["modality"]), _td(s["instances"], "num"),
             _td(s["series_instance_uid"], "uid"), _td(s["last_received_at"]), _td(s["reason"])]
            for s in series]
    return _table(["State", "Modality", "Instances", "Series", "Last received", "Reason"], rows)
