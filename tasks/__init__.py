"""Prefect tasks: thin wrappers that take references, call `sacv`, and return references."""
