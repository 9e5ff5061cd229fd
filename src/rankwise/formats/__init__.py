"""Pure tensor factorizations: SVD, Tucker, CP, tensor-train, hierarchical Tucker, Kronecker."""

from .cp import CP, cp_als
from .ht import HT, HTNode, ht_svd
from .kron import Kronecker, kron_decompose
from .svd import SVD, randomized_svd, truncated_svd, whitened_svd, whitening_factor
from .tt import TT, TTMatrix, tt_matrix, tt_round, tt_svd
from .tucker import Tucker, tucker_hooi, tucker_hosvd

__all__ = [
    "CP",
    "HT",
    "HTNode",
    "Kronecker",
    "SVD",
    "TT",
    "TTMatrix",
    "Tucker",
    "cp_als",
    "ht_svd",
    "kron_decompose",
    "randomized_svd",
    "truncated_svd",
    "tt_matrix",
    "tt_round",
    "tt_svd",
    "tucker_hooi",
    "tucker_hosvd",
    "whitened_svd",
    "whitening_factor",
]
