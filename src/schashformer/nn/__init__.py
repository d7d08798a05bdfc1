"""Torch modules of scHashFormer: the networks only, no data handling or training loops."""

from .cluster_head import ClusterHead, target_distribution
from .local_attention import NeighbourhoodEncoder
from .losses import HashingLoss, NeighbourhoodLoss
from .lsh import LSHIndexer
from .zinb import ZINBDecoder, zinb_nll

__all__ = ["ClusterHead", "HashingLoss", "LSHIndexer", "NeighbourhoodLoss", "NeighbourhoodEncoder", "ZINBDecoder", "target_distribution", "zinb_nll"]
