"""Latency measurement: the timing protocol (the device profiler builds on it)."""
