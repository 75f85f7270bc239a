"""Loyalist segmenter service."""
