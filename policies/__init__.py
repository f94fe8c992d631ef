"""Pluggable policies."""
