"""scHashFormer: fast, scalable scRNA-seq clustering via learnable LSH and local attention.

``schashformer.tl.cluster(adata, n_clusters)`` for the scanpy-style API,
``schashformer.SCHashFormer`` for the estimator, ``schashformer.io.read`` for files.
"""

from . import io, pl, tl  # noqa: E402
from .model import SCHashFormer  # noqa: E402
from .version import __version__

__all__ = ["SCHashFormer", "io", "pl", "tl", "__version__"]
