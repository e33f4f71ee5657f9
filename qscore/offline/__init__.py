"""Offline re-scoring of query logs in process."""
