"""Helpers for the tests only (never imported by the production packages or the benchmarks)."""
