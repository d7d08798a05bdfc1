"""Simulated count data with known ground truth, for tests and benchmarks.

Each simulator lives in its own module of this package and is re-exported here.
"""
