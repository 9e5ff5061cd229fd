"""Pure tensor factorizations: SVD, Tucker, CP, tensor-train, hierarchical Tucker, Kronecker."""

from .svd import SVD, randomized_svd, truncated_svd, whitened_svd, whitening_factor

__all__ = ["SVD", "randomized_svd", "truncated_svd", "whitened_svd", "whitening_factor"]
