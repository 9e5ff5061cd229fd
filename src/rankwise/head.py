"""The LM head (tied to the input embedding or not) as one more target of the global allocation.

A tied ``E`` (vocab, hidden) is factorized as ``A B^T`` (``A`` (vocab, r), ``B`` (hidden, r)): the embedding
lookup becomes ``A[ids] @ B^T`` and the head ``(h @ B) @ A^T``, so one rank prices both uses. An untied head is
measured where the logits are computed (its input Gram is the final-norm output's, its output weights the
logits' squared loss gradients in expectation over the model's prediction, ``p (1 - p)``), in the metric of the
block layers. A tied table is priced both as the head and as the input embedding (:func:`factorize_tied_table`).
"""

from __future__ import annotations

import torch
from torch import nn

from .calibrate import is_causal_lm
from .formats.svd import SVD, whitened_svd, whitening_factor
from .layers.embedding import LowRankEmbedding, TiedLowRankHead
from .layers.linear import LowRankLinear
from .metric import kronecker_gains
from .targets import replace_module


def find_head(model: nn.Module) -> tuple[str, nn.Linear, str | None]:
    """``(head name, head, tied embedding name or None)`` of a causal LM whose ``get_output_embeddings()`` is an
    nn.Linear; ``ValueError`` otherwise (the head is priced by next-token predictions)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    kind = None
    if not isinstance(head, nn.Linear):
        kind = "no LM head" if head is None else f"a {type(head).__name__} LM head"
    elif not is_causal_lm(model):
        kind = "an LM head but is not a causal LM"
    if kind is not None:
        raise ValueError(
            f"include_head: {type(model).__name__} has {kind}; accepted: a model whose get_output_embeddings() "
            "is an nn.Linear (a causal LM)"
        )
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    # the same storage, not only the same Parameter: a streamed model points both names at one loaded tensor
    tied = isinstance(emb, nn.Embedding) and emb.weight.shape == head.weight.shape
    tied = tied and (emb.weight is head.weight or emb.weight.data_ptr() == head.weight.data_ptr() != 0)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return names[id(head)], head, names[id(emb)] if tied else None


def swap_head(model: nn.Module, head_name: str, embedding_name: str | None, factors: SVD | None) -> None:
    """Replace the head (and its tied embedding) by the rank-r ``factors`` of its weight; None: stays dense."""
    if factors is None:
        return
    head = model.get_submodule(head_name)
    if embedding_name is None:
        new = LowRankLinear.from_factors(factors, head.bias, dtype=head.weight.dtype).to(head.weight.device)
        replace_module(model, head_name, new)
        return
    embedding = LowRankEmbedding.from_factors(model.get_submodule(embedding_name), factors)
    replace_module(model, embedding_name, embedding)
    replace_module(model, head_name, TiedLowRankHead.tied_to(embedding, embedding_name))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        # the pair is tied by the head's spec now; transformers' own tying (``lm_head.weight = embed.weight``)
        # has no weight to tie and would fail when a saved checkpoint is loaded
        config.tie_word_embeddings = False


def factorize_tied_table(
    E: torch.Tensor, head_cov: torch.Tensor, head_grad_sq: torch.Tensor, freq: torch.Tensor, grad_gram: torch.Tensor
) -> tuple[SVD, torch.Tensor]:
    """Factors of a tied table ``E`` (vocab, dim) and their per-triplet loss increase ``gains`` (dim,).

    The loss increase of an error ``dE`` is estimated as the sum of two Kronecker-factored terms,
    ``sum_v g_v dE_v C_h dE_v^T`` (the head: ``g = E[(dL/dlogit_v)^2]`` for next tokens drawn from the model,
    ``C_h`` the final-norm output's second moment, as for the block layers) and ``sum_v freq_v dE_v G dE_v^T``
    (the input embedding: token frequencies as the model predicts them, ``G`` the mean outer product of the loss
    gradient at the table's rows). Their sum has
    no closed-form truncation; the SVD is taken in one Kronecker metric that matches both in total (rows
    weighted by ``g_v tr(C_h) + freq_v tr(G)``, columns whitened by ``sum(g) C_h + sum(freq) G``), and the
    gains are the exact tail costs of both terms (:func:`rankwise.metric.kronecker_gains`).
    """
    C, g, fr, G = (t.to(torch.float64).cpu() for t in (head_cov, head_grad_sq, freq, grad_gram))
    d = E.shape[1]
    rows = g * (torch.trace(C) / d) + fr * (torch.trace(G) / d)
    rows = rows.clamp_min(max(float(rows.mean()), 1e-300) * 1e-4)  # no row weighted (then divided) by zero
    f = whitened_svd(
        E.to(torch.float64).cpu(), whitening=whitening_factor(g.sum() * C + fr.sum() * G), rows=rows.sqrt()
    )
    return f, kronecker_gains(f, g, C) + kronecker_gains(f, fr, G)
