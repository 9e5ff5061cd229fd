"""perplexity, embedding_similarity, split_sentences and prefill_throughput, checked against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

import rankwise.eval as ev
from rankwise.eval import embedding_similarity, perplexity, prefill_throughput, sentence_embeddings, split_sentences

from _tiny_models import minilm_dir, tiny_bert, tiny_llama, token_ids


class ConstantLogits(nn.Module):
    """A 'language model' whose next-token distribution is fixed: softmax(bias) at every position."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.config = SimpleNamespace(vocab_size=bias.numel())

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_uniform_model_has_perplexity_vocab_size():
    # log-softmax runs in float32 (as the logits come), so agreement is to float32 precision
    assert perplexity(ConstantLogits(torch.zeros(37)), token_ids(3, 9) % 37, progress=False) == pytest.approx(
        37, rel=1e-6
    )


def test_perplexity_is_exp_of_mean_nll_over_all_predicted_tokens():
    logp = torch.log_softmax(torch.randn(11, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    ids = torch.tensor([[0, 3, 3, 7], [5, 10, 1, 2]])
    predicted = ids[:, 1:].flatten()  # 6 predicted tokens, first token of each row is context only
    expected = math.exp(-float(logp[predicted].mean()))
    assert perplexity(ConstantLogits(logp.float()), ids, progress=False) == pytest.approx(expected, rel=1e-6)


def test_perplexity_matches_transformers_loss():
    model = tiny_llama()
    ids = token_ids(2, 16)
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss for row in ids]
    assert perplexity(model, ids, progress=False) == pytest.approx(
        math.exp(float(torch.stack(losses).mean())), rel=1e-5
    )


def test_perplexity_rejects_bad_token_ids():
    with pytest.raises(
        ValueError, match=r"token_ids must be an integer tensor of shape \(n_seqs, seq_len >= 2\), got \(4,\)"
    ):
        perplexity(tiny_llama(), torch.zeros(4, dtype=torch.long))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def test_embeddings_ignore_padding(tokenizer):
    model = tiny_bert()
    short, long = "A short one.", "A much longer sentence that forces padding onto the short one in a batch."
    together = sentence_embeddings(model, tokenizer, [short, long])
    alone = sentence_embeddings(model, tokenizer, [short])
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    enc = tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        manual = model(**enc).last_hidden_state[0].mean(0)
    assert torch.allclose(alone[0], manual, atol=1e-6)


def test_similarity_to_itself_is_one_and_drops_when_perturbed(tokenizer):
    sentences = split_sentences(
        "The cat sat on the mat today. Dogs bark loudly at night. Rain falls on the plain in Spain."
    )
    model = tiny_bert()
    assert embedding_similarity(model, model, tokenizer, sentences) == pytest.approx(1.0, abs=1e-9)
    other = tiny_bert(seed=1)
    a = sentence_embeddings(model, tokenizer, sentences).double()
    b = sentence_embeddings(other, tokenizer, sentences).double()
    expected = float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())
    got = embedding_similarity(model, other, tokenizer, sentences)
    assert got == pytest.approx(expected, abs=1e-9) and got < 0.99
    with pytest.raises(ValueError, match="sentences must be a non-empty list of strings, got an empty list"):
        embedding_similarity(model, model, tokenizer, [])


def test_split_sentences():
    text = "First sentence is here. Second one?  Yes!\n\nA paragraph\nwith a line break. ok.\n\nShort"
    assert split_sentences(text, min_chars=5) == [
        "First sentence is here.",
        "Second one?",
        "A paragraph with a line break.",
        "Short",
    ]


def test_prefill_throughput_is_tokens_over_median_time(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 14.0, 20.0, 21.0])  # three timed passes: 2 s, 4 s, 1 s -> median 2 s
    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    calls = []
    model = ConstantLogits(torch.zeros(50))
    model.register_forward_hook(lambda m, args, out: calls.append(1))
    assert prefill_throughput(model, seq_len=64, repeats=3) == 32.0
    assert len(calls) == 4  # one warm-up, three timed
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        prefill_throughput(model, seq_len=0)
