"""Loyalist journeys service."""
