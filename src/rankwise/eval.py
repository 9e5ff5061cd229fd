"""Measuring a (compressed) model: perplexity, agreement with a reference's next-token distributions (held-out
text and chat answers), sentence-embedding similarity to a reference, prefill throughput."""

from __future__ import annotations

import inspect
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._validate import int_at_least


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
    float, the perplexity; log-probabilities and the NLL are computed in float64 (as by
    :func:`next_token_agreement`, which gives the same value).
    """
    _check_token_ids(token_ids)
    device = _device(model)
    total, count = 0.0, 0
    for row in tqdm(token_ids, desc="perplexity", unit="seq", disable=not progress, leave=False):
        ids = row[None].to(device)
        logits = model(input_ids=ids).logits[0, :-1]
        for targets, logp in _log_prob_chunks(ids[0, 1:], logits):
            total -= float(logp.gather(1, targets[:, None]).sum())
        count += ids.shape[1] - 1
    return math.exp(total / count)


def _log_prob_chunks(targets: torch.Tensor, *logits: torch.Tensor, chunk: int = 128):
    """``(targets, log_softmax(logits) in float64, ...)`` over chunks of ``chunk`` positions (bounds memory)."""
    for i in range(0, targets.numel(), chunk):
        yield (targets[i : i + chunk], *(F.log_softmax(x[i : i + chunk].double(), dim=-1) for x in logits))


@dataclass(frozen=True)
class Agreement:
    """How closely a model follows a reference on the same tokens (see :func:`next_token_agreement`)."""

    kl: float  # mean KL(reference || model) of the next-token distributions, nats per predicted token
    top1: float  # fraction of predicted positions where both models' most likely next token is the same
    tokens: int  # predicted positions counted
    perplexity: float
    ref_perplexity: float


def _check_token_ids(token_ids) -> None:
    if (
        not isinstance(token_ids, torch.Tensor)
        or token_ids.ndim != 2
        or token_ids.shape[1] < 2
        or token_ids.is_floating_point()
    ):
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids must be an integer tensor of shape (n_seqs, seq_len >= 2), got {shape}")


@torch.inference_mode()
def next_token_agreement(
    model: nn.Module, ref: nn.Module, token_ids: torch.Tensor, *, progress: bool = True
) -> Agreement:
    """Mean KL divergence and top-1 agreement of ``model``'s next-token distributions with ``ref``'s.

    Both models read the same rows; at every predicted position (1..seq_len-1 of each row, as in
    :func:`perplexity`) the KL divergence ``sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` and whether
    both argmaxes agree are accumulated in float64. Both perplexities come from the same forward passes.

    Parameters
    ----------
    model, ref : causal LMs returning ``.logits`` of shape (batch, seq_len, vocab), same vocabulary.
    token_ids : LongTensor, shape (n_seqs, seq_len), seq_len >= 2.

    Returns
    -------
    Agreement

    References
    ----------
    S. Kullback and R. A. Leibler, "On information and sufficiency", Ann. Math. Statist. 22(1), 1951.
    llama.cpp's ``perplexity --kl-divergence`` reports the same two measures for quantized models.
    """
    _check_token_ids(token_ids)
    device = _device(model)
    kl = top1 = nll = ref_nll = 0.0
    count = 0
    for row in tqdm(token_ids, desc="KL to reference", unit="seq", disable=not progress, leave=False):
        ids = row[None].to(device)
        logits = model(input_ids=ids).logits[0, :-1]
        ref_logits = ref(input_ids=ids.to(_device(ref))).logits[0, :-1].to(logits.device)
        for targets, logp, ref_logp in _log_prob_chunks(ids[0, 1:], logits, ref_logits):
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            top1 += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            nll -= float(logp.gather(1, targets[:, None]).sum())
            ref_nll -= float(ref_logp.gather(1, targets[:, None]).sum())
        count += ids.shape[1] - 1
    return Agreement(kl / count, top1 / count, count, math.exp(nll / count), math.exp(ref_nll / count))


@dataclass(frozen=True)
class ChatAgreement:
    """Top-1 agreement along a reference's greedy chat answers (see :func:`chat_agreement`)."""

    top1: float  # fraction of answer tokens that are also the model's most likely next token
    tokens: int  # answer tokens counted (end-of-turn tokens included)
    prompts: int


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a one-turn chat (``prompt`` as the user's message) ending with the assistant's turn opening."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template, so chat prompts cannot be formatted")
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    stops = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(t) for t in stops if t is not None}


@torch.inference_mode()
def greedy_answer(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> torch.Tensor:
    """The model's greedy continuation of ``prompt_ids`` (1-D), up to and including a stop token, as 1-D ids.

    Plain argmax decoding with the model's key/value cache, no generation config (temperature,
    repetition penalty, ...) applied: the continuation is a function of the weights alone.
    """
    # transformers 5.2x renamed the cache argument and output field from past_key_values to cache
    new_name = "cache" in inspect.signature(model.forward).parameters
    out = model(input_ids=prompt_ids[None].to(_device(model)), use_cache=True)
    answer = []
    for _ in range(max_new_tokens):
        token = out.logits[0, -1].argmax()
        answer.append(int(token))
        if answer[-1] in stop_ids:
            break
        cache = {"cache": out.cache} if new_name else {"past_key_values": out.past_key_values}
        out = model(input_ids=token.view(1, 1), use_cache=True, **cache)
    return torch.tensor(answer, dtype=torch.long)


@torch.inference_mode()
def chat_agreement(
    model: nn.Module, ref: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, progress: bool = True
) -> ChatAgreement:
    """Top-1 agreement of ``model`` with ``ref`` along ``ref``'s own greedy answers to chat prompts.

    Each prompt is formatted with the tokenizer's chat template (:func:`chat_prompt_ids`); ``ref`` answers
    it greedily (:func:`greedy_answer`, at most ``max_new_tokens``, stopping after an end-of-turn token);
    ``model`` then reads prompt + answer in one pass, and every answer token counts as agreed when it is
    ``model``'s most likely next token at its position. The measure follows the reference's answer, so one
    early disagreement does not derail the rest as comparing two free generations would.

    Returns
    -------
    ChatAgreement, the top-1 fraction pooled over all answer tokens.
    """
    int_at_least(max_new_tokens, "max_new_tokens", 1)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings, got an empty list")
    stops = _stop_ids(ref, tokenizer)
    agreed = count = 0
    for prompt in tqdm(prompts, desc="chat agreement", unit="prompt", disable=not progress, leave=False):
        ids = chat_prompt_ids(tokenizer, prompt)
        answer = greedy_answer(ref, ids, max_new_tokens, stops)
        full = torch.cat([ids, answer])[None].to(_device(model))
        predicted = model(input_ids=full).logits[0, ids.numel() - 1 : -1].argmax(-1).cpu()
        agreed += int((predicted == answer).sum())
        count += answer.numel()
    return ChatAgreement(agreed / count, count, len(prompts))


def sentence_embeddings(
    model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 32, max_length: int = 256
) -> torch.Tensor:
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
            batch = tokenizer(
                sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(out)


def embedding_similarity(
    model: nn.Module, ref_model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 32
) -> float:
    """Mean over ``sentences`` of the cosine similarity between ``model``'s and ``ref_model``'s embeddings.

    Both are mean-pooled last hidden states (:func:`sentence_embeddings`); 1.0 means identical directions.
    """
    if not sentences:
        raise ValueError("sentences must be a non-empty list of strings, got an empty list")
    a = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size)
    b = sentence_embeddings(ref_model, tokenizer, sentences, batch_size=batch_size)
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def sentence_transformer(model_dir: str | Path, *, device: str = "cpu"):
    """The directory's own sentence-transformers pipeline (its ``modules.json``: transformer, pooling,
    normalization, ...) in eval mode, or ``None`` when it has none or ``sentence-transformers`` is not installed.
    """
    if not (Path(model_dir) / "modules.json").is_file():
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    from .io import hf_quantizer  # noqa: F401  (registers "rankwise" with transformers, which ST loads through)

    return SentenceTransformer(str(model_dir), device=device, local_files_only=True).eval()


def pipeline_similarity(model, ref, sentences: list[str], *, batch_size: int = 32) -> float:
    """Mean over ``sentences`` of the cosine similarity between two sentence-transformers pipelines' embeddings.

    The same measure as :func:`embedding_similarity`, through each pipeline's own pooling and
    normalization instead of mean pooling.
    """
    if not sentences:
        raise ValueError("sentences must be a non-empty list of strings, got an empty list")
    a, b = (
        m.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        for m in (model, ref)
    )
    return float(F.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=-1).mean())


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
    int_at_least(seq_len, "seq_len", 1)
    int_at_least(repeats, "repeats", 1)
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
