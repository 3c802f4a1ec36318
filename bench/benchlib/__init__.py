"""Shared pieces of the Warden benchmark harness (bench/run.py and friends)."""
