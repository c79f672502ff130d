"""Benchmarks of trm_ray against plain baselines, run as `python -m benchmarks.<name> [--smoke]`.

Every figure is a ratio of two things measured side by side in the same run, on the same
machine, so that it means something on any machine; benchmarks/RESULTS.md records them.
"""
