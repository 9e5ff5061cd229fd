"""Checkpoints with the new factorized layer types: the "modules" specs, rankwise.load and stock from_pretrained."""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModel

import rankwise
from rankwise.cli.compress import run_info
from rankwise.io.checkpoint import layer_table, read_quantization_config
from rankwise.layers import (
    KronLinear,
    LowRankEmbedding,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
)

from _tiny_models import factorize_some, tiny_bert, token_ids

RANKS = {"encoder.layer.0.attention.self.query": 4}


def _factorized_bert():
    model = factorize_some(tiny_bert(), RANKS)
    swaps = {
        "embeddings.word_embeddings": lambda m: LowRankEmbedding.from_dense(m, 8),
        "embeddings.position_embeddings": lambda m: TTEmbedding.from_dense(m, 4),
        "encoder.layer.0.intermediate.dense": lambda m: TTLinear.from_dense(m, 3),
        "encoder.layer.1.output.dense": lambda m: KronLinear.from_dense(m, 2),
    }
    for name, make in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))
    return model, swaps


def test_new_layer_types_round_trip_through_rankwise_load_and_from_pretrained(tmp_path, capsys):
    model, swaps = _factorized_bert()
    ids = token_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    rankwise.save(model, tmp_path / "c")
    qc = read_quantization_config(tmp_path / "c")
    assert qc["ranks"] == RANKS
    assert set(qc["modules"]) == set(swaps)
    assert qc["modules"]["embeddings.word_embeddings"] == {
        "layer": "lowrank_embedding",
        "num_embeddings": 30522,
        "embedding_dim": 32,
        "rank": 8,
        "padding_idx": 0,
    }
    assert qc["modules"]["encoder.layer.1.output.dense"]["layer"] == "kron_linear"
    for reloaded in (rankwise.load(tmp_path / "c"), AutoModel.from_pretrained(tmp_path / "c")):
        types = {name: type(reloaded.get_submodule(name)).__name__ for name in swaps}
        assert types == {name: type(model.get_submodule(name)).__name__ for name in swaps}
        assert isinstance(reloaded.get_submodule("encoder.layer.0.attention.self.query"), LowRankLinear)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).last_hidden_state, expected)
    rows, totals = layer_table(tmp_path / "c")
    by_name = {r[0]: r for r in rows}
    assert by_name["encoder.layer.1.output.dense"][1:] == (
        (32, 64),
        2,
        model.get_submodule("encoder.layer.1.output.dense").num_params,
        32 * 64 + 32,
    )
    assert by_name["embeddings.word_embeddings"][3:] == (8 * (30522 + 32), 30522 * 32)
    assert totals["model_after"] == sum(p.numel() for p in model.parameters())
    assert run_info(argparse.Namespace(dir=str(tmp_path / "c"))) == 0
    assert "embeddings.position_embeddings" in capsys.readouterr().out


def test_checkpoints_without_new_layers_keep_the_old_config(tmp_path):
    model = factorize_some(tiny_bert(), RANKS)
    rankwise.save(model, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "rankwise", "version": 1, "ranks": RANKS}
