"""rankwise.save / rankwise.load and stock transformers from_pretrained on tiny Llama, BERT and GPT-2 models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import rankwise
from rankwise.io.checkpoint import layer_table, read_quantization_config
from rankwise.io.hf_quantizer import RankwiseConfig
from rankwise.layers import LowRankLinear

from _tiny_models import factorize_some, tiny_bert, tiny_gpt2, tiny_llama, token_ids

LLAMA_RANKS = {
    "model.layers.0.self_attn.q_proj": 5,
    "model.layers.0.mlp.gate_proj": 7,
    "model.layers.1.mlp.down_proj": 3,
}
BERT_RANKS = {
    "encoder.layer.0.attention.self.query": 4,
    "encoder.layer.1.intermediate.dense": 6,
    "encoder.layer.1.output.dense": 9,
}
GPT2_RANKS = {"transformer.h.0.attn.c_attn": 6, "transformer.h.1.mlp.c_proj": 5}


def unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def weights_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.parametrize(
    "build, ranks, auto",
    [
        (tiny_llama, LLAMA_RANKS, AutoModelForCausalLM),
        (tiny_gpt2, GPT2_RANKS, AutoModelForCausalLM),
    ],
)
def test_causal_lm_round_trip_gives_identical_logits(tmp_path, build, ranks, auto):
    model = factorize_some(build(), ranks)
    ids = token_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    rankwise.save(model, tmp_path / "c")
    assert read_quantization_config(tmp_path / "c") == {"quant_method": "rankwise", "version": 1, "ranks": ranks}
    for reloaded in (rankwise.load(tmp_path / "c"), auto.from_pretrained(tmp_path / "c")):
        assert {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == ranks
        assert not reloaded.training
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_encoder_round_trip_gives_identical_hidden_states(tmp_path):
    model = factorize_some(tiny_bert(), BERT_RANKS)
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rankwise.save(model, tmp_path / "c")
    for reloaded in (rankwise.load(tmp_path / "c"), AutoModel.from_pretrained(tmp_path / "c")):
        assert type(reloaded).__name__ == "BertModel"
        assert isinstance(reloaded.encoder.layer[1].output.dense, LowRankLinear)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state, expected)


def test_base_model_loads_from_causal_lm_checkpoint(tmp_path):
    # names in "ranks" carry the "model." prefix of LlamaForCausalLM; AutoModel builds a LlamaModel without it
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    ids = token_ids(1, 9)
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
    rankwise.save(model, tmp_path / "c")
    base = AutoModel.from_pretrained(tmp_path / "c")
    assert base.layers[1].mlp.down_proj.rank == 3
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).last_hidden_state, expected)


def test_size_on_disk_shrinks_with_parameter_count_and_tied_embeddings_stored_once(tmp_path):
    dense = tiny_llama()
    n_dense = unique_params(dense)
    rankwise.save(dense, tmp_path / "d")
    compressed = factorize_some(
        tiny_llama(), {n: 2 for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    )
    n_comp = unique_params(compressed)
    rankwise.save(compressed, tmp_path / "c")
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    size_d, size_c = weights_size(tmp_path / "d"), weights_size(tmp_path / "c")
    header_allowance = 16 * 1024  # JSON header of a few dozen tensors
    assert 4 * n_dense <= size_d <= 4 * n_dense + header_allowance
    assert 4 * n_comp <= size_c <= 4 * n_comp + header_allowance
    assert n_comp < n_dense


def test_save_leaves_model_untouched_and_refuses_existing_dir(tmp_path):
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        rankwise.save(model, tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
    rankwise.save(model, tmp_path / "c", force=True)
    assert not (tmp_path / "c" / "keep.txt").exists()
    assert not hasattr(model.config, "quantization_config")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_interrupted_save_leaves_no_output(tmp_path, monkeypatch):
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    real = type(model).save_pretrained

    def save_then_interrupt(self, path, **kw):
        real(self, path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        rankwise.save(model, tmp_path / "out" / "c")
    assert os.listdir(tmp_path / "out") == []
    assert not hasattr(model.config, "quantization_config")


def test_report_and_layer_table(tmp_path):
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    rankwise.save(model, tmp_path / "c")
    rows, totals = layer_table(tmp_path / "c")
    # q_proj 32x32 rank 5; gate_proj 64x32 rank 7; down_proj 32x64 rank 3; no biases
    assert rows == [
        ("model.layers.0.mlp.gate_proj", (64, 32), 7, 7 * 96, 64 * 32),
        ("model.layers.0.self_attn.q_proj", (32, 32), 5, 5 * 64, 32 * 32),
        ("model.layers.1.mlp.down_proj", (32, 64), 3, 3 * 96, 32 * 64),
    ]
    assert totals["model_after"] == unique_params(model)
    assert totals["model_before"] == unique_params(tiny_llama())


def test_not_a_rankwise_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(
        ValueError,
        match="is not a rankwise directory: config.json has no quantization_config with quant_method 'rankwise'",
    ):
        rankwise.load(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not found"):
        rankwise.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="save expects a transformers PreTrainedModel, got Linear"):
        rankwise.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="format version must be 1, got 2"):
        RankwiseConfig({}, version=2)
    with pytest.raises(ValueError, match="ranks must be ints >= 1, got 0 for 'a.b'"):
        RankwiseConfig({"a.b": 0})
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    rankwise.save(model, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["quantization_config"]["ranks"]["model.layers.9.mlp.up_proj"] = 4
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match="lists module 'model.layers.9.mlp.up_proj', which this LlamaForCausalLM does not have"
    ):
        rankwise.load(tmp_path / "c")


def test_import_rankwise_registers_with_transformers_lazily(tmp_path):
    model = factorize_some(tiny_llama(), LLAMA_RANKS)
    rankwise.save(model, tmp_path / "c")
    code = (
        "import sys, rankwise\n"
        "assert 'transformers.quantizers.auto' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__, m.model.layers[0].self_attn.q_proj.rank)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LowRankLinear", "5"]
