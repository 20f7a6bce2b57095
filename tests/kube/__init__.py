"""Helpers for the tests that run against the real control plane (scripts/cluster.sh)."""
