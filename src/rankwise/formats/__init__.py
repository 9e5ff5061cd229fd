"""Pure tensor factorizations: SVD, Tucker, CP, tensor-train, hierarchical Tucker, Kronecker."""

from .cp import CP, cp_als
from .ht import HT, HTNode, ht_svd
from .kron import Kronecker, kron_decompose
from .protocol import FORMATS, Factorization, can_truncate, decompose, format_class
from .svd import SVD, randomized_svd, truncated_svd, whitened_svd, whitening_factor
from .tt import TT, TTMatrix, tt_matrix, tt_round, tt_svd
from .tucker import Tucker, tucker_hooi, tucker_hosvd

__all__ = [
    "CP",
    "FORMATS",
    "HT",
    "SVD",
    "TT",
    "Factorization",
    "HTNode",
    "Kronecker",
    "TTMatrix",
    "Tucker",
    "can_truncate",
    "cp_als",
    "decompose",
    "format_class",
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
