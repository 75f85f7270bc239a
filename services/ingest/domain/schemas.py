"""The versioned JSON Schemas of canonical events (``schemas/events/<name>.v<N>.json``), used to validate
every event at ingest.

A schema names what it describes in ``x-loyalist``: ``{"type": "track", "event": "Order Completed",
"version": 1}``; a call-type schema (``identify.v1.json``) has no ``event``. A track event without its own
schema is checked against the generic ``track`` schema.

>>> from services.ingest.adapters.schema_files import load_schema_documents
>>> registry = SchemaRegistry.from_documents(load_schema_documents())
>>> registry.schema_for("track", "Order Completed", 1).name
'order_completed.v1'
>>> registry.schema_for("track", "Some Custom Event", 1).name
'track.v1'
>>> ok = {"type": "track", "event": "Order Completed", "messageId": "m", "timestamp": "2024-01-01T00:00:00Z",
...       "properties": {"order_id": "1001", "total": 12.5, "currency": "EUR"}}
>>> registry.violation(ok) is None
True
>>> registry.violation({**ok, "properties": {"order_id": "1001", "total": "12.5"}})
'order_completed.v1: properties.total: "12.5" is not of type "number"'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema_rs


@dataclass(frozen=True, slots=True)
class EventSchema:
    name: str  # file stem, e.g. "order_completed.v1"
    call_type: str
    event: str | None
    version: int
    document: dict[str, Any]
    validator: Any


class SchemaRegistry:
    def __init__(self, schemas: list[EventSchema]) -> None:
        self.schemas = schemas
        self._by_key = {(s.call_type, s.event, s.version): s for s in schemas}

    @classmethod
    def from_documents(cls, documents: list[tuple[str, dict[str, Any]]]) -> SchemaRegistry:
        """(name, JSON Schema document) pairs, e.g. ``("order_completed.v1", {...})``."""
        schemas = []
        for name, document in documents:
            meta = document["x-loyalist"]
            schemas.append(EventSchema(
                name=name, call_type=meta["type"], event=meta.get("event"), version=int(meta["version"]),
                document=document, validator=jsonschema_rs.validator_for(document),
            ))
        return cls(schemas)

    def schema_for(self, call_type: str, event: str | None, version: int) -> EventSchema | None:
        if call_type == "track":
            specific = self._by_key.get(("track", event, version))
            if specific is not None:
                return specific
        return self._by_key.get((call_type, None, version))

    def violation(self, document: dict[str, Any]) -> str | None:
        """None when the event document (wire field names) is valid, else the first problem, readable."""
        schema = self.schema_for(document.get("type", ""), document.get("event"), document.get("schemaVersion", 1))
        if schema is None:
            return f"no schema for {document.get('type')!r} version {document.get('schemaVersion', 1)}"
        if schema.validator.is_valid(document):
            return None
        error = next(iter(schema.validator.iter_errors(document)))
        where = ".".join(str(p) for p in error.instance_path) or "(root)"
        return f"{schema.name}: {where}: {error.message}"

    def catalog(self) -> list[dict[str, Any]]:
        """Name, type, event and version of every schema (the ``GET /v1/schemas`` listing)."""
        return [
            {"name": s.name, "type": s.call_type, "event": s.event, "version": s.version,
             "description": s.document.get("description", "")}
            for s in self.schemas
        ]
