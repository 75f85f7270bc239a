"""Ingest's adapters: Kafka publishing, Redis guards (dedup, rate limits), Cassandra shop sources."""
