"""Profiling: latency, power, energy."""
