"""Logging setup shared by every process: plain text for humans, JSON lines when LOYALIST_LOG_JSON=1."""

from __future__ import annotations

import logging
import sys

import orjson

from loyalist.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class BatchWarningFilter(logging.Filter):
    """Drops Cassandra's warnings about multi-partition unlogged batches, which the services send on purpose
    (``loyalist.cassandra.write_batches``: idempotent upserts, grouped to save client CPU) and which a cluster
    with stock thresholds would otherwise report on every such request."""

    MARKERS = ("Unlogged batch covering", "exceeding specified threshold")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg) if not record.args else record.getMessage()
        return not (message.startswith("Server warning") and any(m in message for m in self.MARKERS))


def configure_logging(settings: Settings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # The drivers are chatty at INFO.
    for noisy in ("cassandra", "aiokafka", "kafka", "faust", "mode", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("cassandra.protocol").addFilter(BatchWarningFilter())
