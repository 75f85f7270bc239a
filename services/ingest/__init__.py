"""Loyalist ingest service."""
