"""Loyalist profile service."""
