"""Prefect flows and the `graft` command line: wiring only, the logic lives in components/."""
