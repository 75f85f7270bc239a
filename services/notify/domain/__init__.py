"""Notify's pure domain: the send policy, message requests and states, templates, signed links, retry
schedules. No I/O here (an import-linter contract forbids brokers, stores and web frameworks)."""
