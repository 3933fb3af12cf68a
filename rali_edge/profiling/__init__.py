"""Profiling: latency, power, energy, against the MLLM baseline.

session.run_profile is the whole job (what `rali-edge profile` runs); runner.py holds the
measurement loops, power.py the power sources, baseline.py Q-Insight, stats.py the timers and
summaries, report.py the JSON, markdown and plots.
"""
