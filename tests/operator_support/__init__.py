"""Helpers for the operator tests: CRD schema/CEL checks and a Kubernetes API emulator."""
