"""Reference pipelines that scHashFormer is measured against, run on the same input."""

from .dec import ZINBDEC
from .scanpy_pipeline import pca_embedding, pca_kmeans, scanpy_leiden

__all__ = ["ZINBDEC", "pca_embedding", "pca_kmeans", "scanpy_leiden"]
