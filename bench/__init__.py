"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

Run `python -m bench.run` (see `bench/run.py`); results go to `bench/RESULTS.md`.
"""
