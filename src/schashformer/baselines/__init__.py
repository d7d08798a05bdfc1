"""Reference pipelines that scHashFormer is measured against, run on the same input."""

from .scanpy_pipeline import pca_kmeans, scanpy_leiden

__all__ = ["pca_kmeans", "scanpy_leiden"]
