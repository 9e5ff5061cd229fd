"""Model resolution: directories, .safetensors, .gguf (cached conversion), aliases, and every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rankwise.io import models
from rankwise.io.models import cache_dir, converted_gguf, load_model

from _tiny_models import save_model_dir, tiny_bert, tiny_llama, token_ids


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), tmp_path_factory.mktemp("m") / "llama")


def test_directory_and_safetensors_file_load_the_same_model(llama_dir):
    ids = token_ids(1, 10)
    with torch.no_grad():
        expected = tiny_llama()(input_ids=ids).logits
    for spec in (llama_dir, str(llama_dir / "model.safetensors")):
        model, tokenizer, kind = load_model(spec)
        assert kind == "causal-lm" and type(model).__name__ == "LlamaForCausalLM" and not model.training
        assert tokenizer("hello world").input_ids == [101, 7592, 2088, 102]  # MiniLM WordPiece ids
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected)


def test_encoder_kind(tmp_path):
    model, _, kind = load_model(save_model_dir(tiny_bert(), tmp_path / "bert"))
    assert kind == "encoder" and type(model).__name__ == "BertModel"


def test_missing_path_and_unknown_alias():
    with pytest.raises(
        FileNotFoundError,
        match=r"model '/no/such/dir' not found: expected a transformers model directory, "
        r"a \.gguf or \.safetensors file$",
    ):
        load_model("/no/such/dir")
    with pytest.raises(FileNotFoundError, match=r"model 'smollm3' not found: .*; built-in aliases: minilm, smollm2$"):
        load_model("smollm3")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(
        ValueError, match=f"model directory '{tmp_path}' has no config.json: not a transformers model directory"
    ):
        load_model(tmp_path)


def test_unknown_file_type(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(
        ValueError, match="is not a directory, .gguf or .safetensors file; accepted: those, or an alias"
    ):
        load_model(tmp_path / "model.bin")


@pytest.mark.parametrize("keep_bytes", [5, 200, -100])
def test_truncated_safetensors_names_the_file(tmp_path, llama_dir, keep_bytes):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llama_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[:keep_bytes] if f.suffix == ".safetensors" else data)
    target = bad / "model.safetensors"
    for spec in (bad, target):
        with pytest.raises(ValueError, match=f"^corrupted or truncated safetensors file '{target}': "):
            load_model(spec)


def test_nan_weight_is_named(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^weight 'model.layers.1.mlp.up_proj.weight' holds NaN or Inf values"):
        load_model(save_model_dir(model, tmp_path / "nan"))


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RANKWISE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rankwise"


def test_gguf_cache_hit_skips_conversion_and_is_keyed_by_mtime(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match=f"^corrupted or truncated GGUF file '{gguf}': "):
        converted_gguf(gguf, progress=False)
    assert not any((tmp_path / "cache").glob("gguf-*"))  # a failed conversion leaves nothing
    # a cache entry for this exact file (path, size, mtime) is used as is, without reading the file
    target = tmp_path / "cache" / f"gguf-m-{models._gguf_cache_key(gguf)}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert converted_gguf(gguf, progress=False) == target
    os.utime(gguf, ns=(0, 10**9))  # touched file: new key, conversion runs (and fails on this file)
    with pytest.raises(ValueError, match="corrupted or truncated GGUF file"):
        converted_gguf(gguf, progress=False)


@pytest.mark.slow
def test_truncated_real_gguf_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    real = models.ALIASES["smollm2"]()
    bad = tmp_path / real.name
    with open(real, "rb") as f:
        bad.write_bytes(f.read(4_000_000))  # metadata and the first tensors, then cut
    with pytest.raises(ValueError, match=f"^corrupted or truncated GGUF file '{bad}': "):
        load_model(bad)


@pytest.mark.slow
def test_minilm_alias():
    model, tokenizer, kind = load_model("minilm")
    assert kind == "encoder" and type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tokenizer("hello world").input_ids == [101, 7592, 2088, 102]
