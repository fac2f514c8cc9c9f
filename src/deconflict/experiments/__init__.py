"""Experiments from the papers, built on the public API only."""
