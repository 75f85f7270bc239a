"""Ingest's HTTP routers (thin: read the request, call the pipeline, answer)."""
