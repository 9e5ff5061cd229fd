"""Measuring a (compressed) model: perplexity, sentence-embedding similarity to a reference, prefill throughput."""

from __future__ import annotations

import math
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: torch.Tensor, *, progress: bool = True) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every predicted token.

    Parameters
    ----------
    model : causal LM returning ``.logits`` of shape (batch, seq_len, vocab).
    token_ids : LongTensor, shape (n_seqs, seq_len), seq_len >= 2. Each row is scored on its own
        (positions 1..seq_len-1 predicted from their prefix), so ``n_seqs * (seq_len - 1)`` tokens count.

    Returns
    -------
    float, the perplexity; the NLL is accumulated in float64.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 2 or token_ids.shape[1] < 2 or token_ids.is_floating_point():
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids must be an integer tensor of shape (n_seqs, seq_len >= 2), got {shape}")
    device = _device(model)
    total, count = 0.0, 0
    for row in tqdm(token_ids, desc="perplexity", unit="seq", disable=not progress, leave=False):
        ids = row[None].to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum").double())
        count += ids.shape[1] - 1
    return math.exp(total / count)


def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Mean-pooled last hidden states over the non-padding tokens, shape (len(sentences), hidden), float32.

    References
    ----------
    N. Reimers and I. Gurevych, "Sentence-BERT: Sentence embeddings using Siamese BERT-networks",
    EMNLP 2019 (mean pooling, as all-MiniLM-L6-v2 is trained with).
    """
    device = _device(model)
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(out)


def embedding_similarity(model: nn.Module, ref_model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 32) -> float:
    """Mean over ``sentences`` of the cosine similarity between ``model``'s and ``ref_model``'s embeddings.

    Both are mean-pooled last hidden states (:func:`sentence_embeddings`); 1.0 means identical directions.
    """
    if not sentences:
        raise ValueError("sentences must be a non-empty list of strings, got an empty list")
    a = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size)
    b = sentence_embeddings(ref_model, tokenizer, sentences, batch_size=batch_size)
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def split_sentences(text: str, *, min_chars: int = 20, max_chars: int = 400) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``!``, ``?`` followed by whitespace, or at blank lines),
    whitespace-collapsed, keeping those of ``min_chars`` to ``max_chars`` characters, in order."""
    pieces = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    sentences = (" ".join(p.split()) for p in pieces)
    return [s for s in sentences if min_chars <= len(s) <= max_chars]


@torch.inference_mode()
def prefill_throughput(model: nn.Module, seq_len: int = 512, repeats: int = 3, *, seed: int = 0) -> float:
    """Tokens per second of one forward pass over a single sequence of ``seq_len`` random token ids.

    One untimed warm-up pass, then the median of ``repeats`` timed passes (robust to other jobs on
    a shared machine). Token ids are drawn from ``model.config.vocab_size`` with ``seed``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen).to(_device(model))
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    model(input_ids=ids)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids)
        sync()
        times.append(time.perf_counter() - t0)
    return seq_len / statistics.median(times)
