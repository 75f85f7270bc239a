"""Pure ingest logic: tracking-call normalisation, schema validation, platform payload mappings."""
