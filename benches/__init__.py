"""Benchmarks: ``pytest benches/ --benchmark-only``, and scripts run from the repository root as
modules: ``python -m benches.kv_cpu``, ``python -m benches.prefill_cpu``, ``python -m benches.gpu_timing``."""
