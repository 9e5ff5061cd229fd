"""Factorized nn.Embedding tables: low-rank (codes @ projection) and TT-matrix (one core slice per index digit).

References
----------
P. H. Chen et al., "GroupReduce: block-wise low-rank approximation for neural language model shrinking",
NeurIPS 2018 (low-rank, frequency-weighted embeddings); O. Hrinchuk et al., "Tensorized embedding layers",
Findings of EMNLP 2020, arXiv:1901.10787 (TT embeddings).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.svd import SVD, svd_rank, truncated_svd, whitened_svd
from ..formats.tt import TTMatrix, tt_matrix
from .registry import LAYERS
from .tt import check_tt_dims


def _scale_spec(scale: float) -> dict:
    """The spec entry of an output scale: none for 1 (the specs of plain tables stay as they were)."""
    return {} if scale == 1.0 else {"scale": scale}


def _check_embedding(emb: nn.Module, layer: str) -> None:
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{layer}.from_dense expects an nn.Embedding, got {type(emb).__name__}")
    if emb.max_norm is not None or emb.sparse:
        raise ValueError(
            f"{layer}: an nn.Embedding with max_norm={emb.max_norm} or sparse={emb.sparse} cannot be "
            "factorized (its rows are renormalized / updated sparsely in place); accepted: max_norm=None, "
            "sparse=False"
        )


def embedding_scale(emb: nn.Embedding) -> float:
    """The constant ``s`` with ``emb(ids) = s * emb.weight[ids]``: 1 for nn.Embedding, ``sqrt(hidden)`` for
    Gemma's scaled embedding. ValueError naming the module when its output is not its rows times a constant."""
    ids = torch.arange(min(emb.num_embeddings, 16), device=emb.weight.device)
    with torch.no_grad():
        out, rows = emb(ids).to(torch.float64), emb.weight[ids].to(torch.float64)
    s = float((out * rows).sum() / (rows * rows).sum().clamp_min(1e-300))
    if float(torch.linalg.norm(out - s * rows)) > 1e-3 * float(torch.linalg.norm(out)):
        raise ValueError(
            f"{type(emb).__name__}: its output is not its table's rows times a constant, so a factorized table "
            "cannot stand in for it; accepted: nn.Embedding and subclasses that scale its rows"
        )
    return 1.0 if s == 1.0 else s


@LAYERS.register("lowrank_embedding", paper="https://arxiv.org/abs/1806.06950")
class LowRankEmbedding(nn.Module):
    """``E ≈ codes.weight @ proj.weight.T``: an (num_embeddings, r) table and a (dim, r) projection.

    ``forward(ids) = proj(codes(ids))``; ``logits(h) = codes.weight @ (proj.weight.T h)`` is the tied
    LM head without forming E. State dict keys ``codes.weight`` and ``proj.weight``.
    """

    layer_type = "lowrank_embedding"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
        self.rank, self.padding_idx = int(spec["rank"]), spec.get("padding_idx")
        self.scale = float(spec.get("scale", 1.0))  # the output's factor (Gemma's scaled embedding)
        self.codes = nn.Embedding(
            self.num_embeddings, self.rank, padding_idx=self.padding_idx, device=device, dtype=dtype
        )
        self.proj = nn.Linear(self.rank, self.embedding_dim, bias=False, device=device, dtype=dtype)

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "padding_idx": self.padding_idx,
        } | _scale_spec(self.scale)

    @classmethod
    def from_factors(cls, emb: nn.Embedding, svd: SVD) -> LowRankEmbedding:
        """Build from ``E ≈ U diag(S) Vh``, sqrt(S) on both sides; ``emb``'s output scale is kept."""
        dt, dev = emb.weight.dtype, emb.weight.device
        spec = {
            "num_embeddings": emb.num_embeddings,
            "embedding_dim": emb.embedding_dim,
            "rank": svd.rank,
            "padding_idx": emb.padding_idx,
        } | _scale_spec(embedding_scale(emb))
        layer = cls(spec, device=dev, dtype=dt)
        root = svd.S.to(torch.float64).sqrt()
        with torch.no_grad():
            layer.codes.weight.copy_((svd.U.to(torch.float64) * root).to(dev, dt))
            layer.proj.weight.copy_((svd.Vh.to(torch.float64) * root[:, None]).T.to(dev, dt))
        return layer

    @classmethod
    def from_dense(cls, emb: nn.Embedding, rank=None, *, row_weights: torch.Tensor | None = None) -> LowRankEmbedding:
        """Truncated SVD of the table; with ``row_weights`` (e.g. sqrt of token frequencies, shape
        (num_embeddings,), > 0) the SVD minimises ``||diag(row_weights) (E - E_r)||_F`` instead."""
        _check_embedding(emb, "lowrank_embedding")
        E = emb.weight.detach().to(torch.float64)
        try:
            r = svd_rank(tuple(E.shape), rank)
            svd = truncated_svd(E, r) if row_weights is None else whitened_svd(E, r, rows=row_weights)
        except ValueError as exc:
            raise ValueError(f"lowrank_embedding {E.shape[0]}x{E.shape[1]}: {exc}") from None
        return cls.from_factors(emb, svd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.proj(self.codes(ids))
        return out if self.scale == 1.0 else out * self.scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ E^T`` (a tied LM head) as two thin products."""
        return (hidden @ self.proj.weight) @ self.codes.weight.T

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        return self.codes.weight.detach().to(torch.float64) @ self.proj.weight.detach().to(torch.float64).T

    def to_dense(self) -> nn.Embedding:
        ref = self.codes.weight
        dense = nn.Embedding(
            self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=ref.device, dtype=ref.dtype
        )
        with torch.no_grad():
            dense.weight.copy_((self.scale * self.dense_weight()).to(ref.dtype))
        return dense


@LAYERS.register("tt_embedding", paper="https://arxiv.org/abs/1901.10787")
class TTEmbedding(nn.Module):
    """The (num_embeddings, dim) table as a TT-matrix: ``cores[k]`` (r_{k-1}, m_k, n_k, r_k), prod m_k =
    num_embeddings, prod n_k = dim. Row ``i`` with digits (i_1..i_d) (row-major in the m_k) is
    ``G_1[:, i_1] ... G_d[:, i_d]``, computed from the gathered core slices only.

    ``padding_idx`` is kept for ``to_dense``; its row shares the cores, so fine-tuning moves it too.
    """

    layer_type = "tt_embedding"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
        self.row_dims, self.col_dims, self.ranks = (
            tuple(spec["row_dims"]),
            tuple(spec["col_dims"]),
            tuple(spec["ranks"]),
        )
        self.padding_idx = spec.get("padding_idx")
        self.scale = float(spec.get("scale", 1.0))  # the output's factor (Gemma's scaled embedding)
        full = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], m, n, full[k + 1], device=device, dtype=dtype))
            for k, (m, n) in enumerate(zip(self.row_dims, self.col_dims))
        )
        self._strides = tuple(math.prod(self.row_dims[k + 1 :]) for k in range(len(self.row_dims)))

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "row_dims": list(self.row_dims),
            "col_dims": list(self.col_dims),
            "ranks": list(self.ranks),
            "padding_idx": self.padding_idx,
        } | _scale_spec(self.scale)

    @classmethod
    def from_factors(cls, emb: nn.Embedding, ttm: TTMatrix) -> TTEmbedding:
        dt, dev = emb.weight.dtype, emb.weight.device
        spec = {
            "num_embeddings": emb.num_embeddings,
            "embedding_dim": emb.embedding_dim,
            "row_dims": ttm.row_dims,
            "col_dims": ttm.col_dims,
            "ranks": ttm.ranks,
            "padding_idx": emb.padding_idx,
        } | _scale_spec(embedding_scale(emb))
        layer = cls(spec, device=dev, dtype=dt)
        with torch.no_grad():
            for p, core in zip(layer.cores, ttm.cores):
                p.copy_(core.to(dev, dt))
        return layer

    @classmethod
    def from_dense(cls, emb: nn.Embedding, rank=None, *, row_dims=None, col_dims=None, d: int = 3) -> TTEmbedding:
        """TT-SVD of the table as a TT-matrix; ``rank`` as in :func:`tt_svd` (None: exact)."""
        _check_embedding(emb, "tt_embedding")
        rows = check_tt_dims("tt_embedding", "row_dims", row_dims, emb.num_embeddings, d)
        cols = check_tt_dims("tt_embedding", "col_dims", col_dims, emb.embedding_dim, len(rows))
        if len(rows) != len(cols):
            raise ValueError(
                f"tt_embedding: format 'tt' needs row_dims and col_dims of one length, got {rows} and {cols}"
            )
        try:
            ttm = tt_matrix(emb.weight.detach().to(torch.float64), rows, cols, rank)
        except ValueError as exc:
            raise ValueError(f"tt_embedding {emb.num_embeddings}x{emb.embedding_dim}: {exc}") from None
        return cls.from_factors(emb, ttm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        digits = [(flat // stride) % m for stride, m in zip(self._strides, self.row_dims)]
        state = self.cores[0][0, digits[0]]  # (B, n_1, r_1)
        for k in range(1, len(self.cores)):
            piece = self.cores[k].permute(1, 0, 2, 3)[digits[k]]  # (B, r_{k-1}, n_k, r_k)
            state = torch.einsum("bar,brns->bans", state, piece).reshape(flat.shape[0], -1, piece.shape[-1])
        out = state.reshape(*ids.shape, self.embedding_dim)
        return out if self.scale == 1.0 else out * self.scale

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        return TTMatrix(tuple(c.detach().to(torch.float64) for c in self.cores)).to_dense()

    def to_dense(self) -> nn.Embedding:
        ref = self.cores[0]
        dense = nn.Embedding(
            self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=ref.device, dtype=ref.dtype
        )
        with torch.no_grad():
            dense.weight.copy_((self.scale * self.dense_weight()).to(ref.dtype))
        return dense


EMBEDDING_FORMATS = {"svd": LowRankEmbedding, "tt": TTEmbedding}


@LAYERS.register("tied_lowrank_head")
class TiedLowRankHead(nn.Module):
    """An LM head tied to a :class:`LowRankEmbedding`: ``logits = (h @ B) @ A^T`` with the embedding's own
    factors (``A = codes.weight`` (vocab, r), ``B = proj.weight`` (dim, r)), so the pair stores ``E ~ A B^T``
    once. It owns no parameters; the embedding is held by reference (not a child: the state dict stays the
    embedding's) and found again by its qualified name ``spec()["embedding"]`` when a checkpoint is loaded.
    """

    layer_type = "tied_lowrank_head"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(spec["in_features"]), int(spec["out_features"])
        self.rank, self.embedding_name = int(spec["rank"]), str(spec["embedding"])
        object.__setattr__(self, "_embedding", None)

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "embedding": self.embedding_name,
        }

    def bind(self, embedding: LowRankEmbedding) -> TiedLowRankHead:
        """Tie this head to ``embedding`` (a LowRankEmbedding of this head's shape and rank)."""
        shape = (embedding.num_embeddings, embedding.embedding_dim, embedding.rank)
        if not isinstance(embedding, LowRankEmbedding) or shape != (self.out_features, self.in_features, self.rank):
            raise ValueError(
                f"tied_lowrank_head {self.out_features}x{self.in_features} rank {self.rank} must be tied to a "
                f"lowrank_embedding of that shape and rank, got {type(embedding).__name__}"
            )
        object.__setattr__(self, "_embedding", embedding)
        return self

    @classmethod
    def tied_to(cls, embedding: LowRankEmbedding, name: str) -> TiedLowRankHead:
        """The head of ``embedding``, whose qualified name in the model is ``name``."""
        spec = {
            "in_features": embedding.embedding_dim,
            "out_features": embedding.num_embeddings,
            "rank": embedding.rank,
            "embedding": name,
        }
        return cls(spec).bind(embedding)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._embedding is None:
            raise ValueError(f"tied_lowrank_head is not tied to its embedding {self.embedding_name!r}; call bind()")
        return self._embedding.logits(hidden)

    @property
    def num_params(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, tied"
