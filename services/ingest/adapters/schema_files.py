"""Reading the versioned event schemas from ``schemas/events/*.v<N>.json`` (done once at startup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

SCHEMAS_DIR = Path(__file__).resolve().parents[3] / "schemas" / "events"


def load_schema_documents(directory: Path = SCHEMAS_DIR) -> list[tuple[str, dict[str, Any]]]:
    return [(path.name.removesuffix(".json"), orjson.loads(path.read_bytes()))
            for path in sorted(directory.glob("*.v*.json"))]
