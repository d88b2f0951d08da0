"""Log set-up for the node's processes: plain text for a terminal, or one JSON object per line for collectors.

Log lines carry job ids and DICOM UIDs, never patient names or IDs (nothing in pe-node logs them at any level).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

from pe_node.config import LoggingConfig

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, thread, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: LoggingConfig) -> None:
    """Send every log record to stderr in the configured form; quiet the chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.json_format else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for noisy in ("apscheduler", "alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(config.level)))
    # pynetdicom logs every refused connection at ERROR; pe-node reports each failure itself, with context.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if config.level == "DEBUG" else logging.CRITICAL)
