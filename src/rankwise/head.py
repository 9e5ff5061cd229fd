"""The LM head (tied to the input embedding or not) as one more target of the global allocation.

A tied ``E`` (vocab, hidden) is factorized as ``A B^T`` (``A`` (vocab, r), ``B`` (hidden, r)): the embedding
lookup becomes ``A[ids] @ B^T`` and the head ``(h @ B) @ A^T``, so one rank prices both uses. The head is
measured where the logits are computed (its input Gram is the final-norm output's, its output weights the
logits' squared loss gradients), in the metric of the block layers; the embedding's own effect on the loss
is not measured.
"""

from __future__ import annotations

from torch import nn

from .formats.svd import SVD
from .layers.embedding import LowRankEmbedding, TiedLowRankHead
from .layers.linear import LowRankLinear
from .targets import replace_module


def find_head(model: nn.Module) -> tuple[str, nn.Linear, str | None]:
    """``(head name, head, tied embedding name or None)`` of a model whose ``get_output_embeddings()`` is an
    nn.Linear; ``ValueError`` otherwise."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        kind = "no LM head" if head is None else f"a {type(head).__name__} LM head"
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
