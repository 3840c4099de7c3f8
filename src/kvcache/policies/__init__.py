"""Retention policies: which tokens of the cache to keep."""
