"""Audits over time: audit ids and history, drift between audits, policy checks."""
