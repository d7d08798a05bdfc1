"""scHashFormer: fast, scalable scRNA-seq clustering via learnable LSH and local attention."""
__version__ = "0.1.0"

