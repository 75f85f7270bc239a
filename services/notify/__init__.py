"""Loyalist notify service."""
