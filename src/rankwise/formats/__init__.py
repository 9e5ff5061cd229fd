"""Pure tensor factorizations: SVD, Tucker, CP, tensor-train, hierarchical Tucker, Kronecker."""

from .ht import HT, HTNode, ht_svd
from .kron import Kronecker, kron_decompose
from .svd import SVD, randomized_svd, truncated_svd, whitened_svd, whitening_factor
from .tt import TT, TTMatrix, tt_matrix, tt_round, tt_svd

__all__ = [
    "HT",
    "HTNode",
    "Kronecker",
    "SVD",
    "TT",
    "TTMatrix",
    "ht_svd",
    "kron_decompose",
    "randomized_svd",
    "truncated_svd",
    "tt_matrix",
    "tt_round",
    "tt_svd",
    "whitened_svd",
    "whitening_factor",
]
