"""Simulated count data with known ground truth, for tests and benchmarks.

Each simulator lives in its own module of this package and is re-exported here.
"""
from .batches import add_batch_effects  # noqa: E402,F401  (technical pseudo-batches on real counts)
from .branching import simulate_branching  # noqa: F401  (branching differentiation, known pseudotime)
from .simulate import REFERENCES, SYNTHETIC, SimulationParams, fit_reference, simulate, unequal_types  # noqa: E402,F401
