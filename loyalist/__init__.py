"""Loyalist shared core: settings, event envelope, topics, adapters, auth, HTTP and metrics plumbing.

Every service imports what it needs from here instead of repeating it.
"""

__version__ = "0.1.0"
