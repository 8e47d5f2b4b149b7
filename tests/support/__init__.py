"""Helpers shared by several test modules (and the benchmarks): plain modules, not tests."""
