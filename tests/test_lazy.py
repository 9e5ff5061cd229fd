"""Lazy checkpoint reading and streamed sharded writing: round-trips, stock-reader compatibility, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.io import as_checkpoint, iter_tensors, open_checkpoint, write_checkpoint

from _tiny_models import tiny_model


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(6, 5, generator=g),
        "layer.0.bias": torch.randn(6, generator=g).half(),
        "layer.1.weight": torch.randn(4, 6, generator=g).bfloat16(),
        "steps": torch.arange(3, dtype=torch.int64),
    }


def test_single_file_round_trip_readable_by_safetensors(tmp_path):
    sd = _state()
    write_checkpoint(tmp_path / "out", sd, config={"model_type": "toy"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    stock = load_file(tmp_path / "out" / "model.safetensors")
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.keys() == sorted(sd)
    assert ckpt.config == {"model_type": "toy"}
    for name, t in sd.items():
        assert torch.equal(stock[name], t) and stock[name].dtype == t.dtype
        assert torch.equal(ckpt.get(name), t)
        assert ckpt.shape(name) == tuple(t.shape) and ckpt.dtype(name) == t.dtype


def test_sharded_round_trip_respects_shard_size(tmp_path):
    sd = _state()
    # bytes in order: 120, 12, 48, 24 -> the oversized first tensor alone, then 12+48 <= 64, then 24
    write_checkpoint(tmp_path / "out", iter(sd.items()), max_shard_bytes=64)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "layer.0.weight": "model-00001-of-00003.safetensors",
        "layer.0.bias": "model-00002-of-00003.safetensors",
        "layer.1.weight": "model-00002-of-00003.safetensors",
        "steps": "model-00003-of-00003.safetensors",
    }
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.config is None
    got = dict(iter_tensors(ckpt))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    write_checkpoint(tmp_path / "two", sd, max_shard_bytes=132)  # 120+12, then 48+24
    shards2 = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())["weight_map"]
    assert [shards2[k][6:11] for k in sd] == ["00001", "00001", "00002", "00002"]


def test_reads_stock_safetensors_file_and_hf_model_dir(tmp_path):
    model = tiny_model(
        "llama",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model.save_pretrained(tmp_path / "hf", max_shard_size="4KB")
    ckpt = open_checkpoint(tmp_path / "hf")
    assert ckpt.config["hidden_size"] == 16
    sd = {k: v for k, v in model.state_dict().items() if k in ckpt}
    assert len(ckpt.keys()) >= len(sd) - 1  # tied lm_head may be omitted by save_pretrained
    for name in ckpt.keys():
        assert torch.equal(ckpt.get(name), sd[name])
    save_file({"w": torch.ones(2, 2)}, tmp_path / "plain.safetensors")
    assert torch.equal(open_checkpoint(tmp_path / "plain.safetensors").get("w"), torch.ones(2, 2))


def test_module_and_state_dict_sources():
    lin = torch.nn.Linear(3, 2)
    src = as_checkpoint(lin)
    assert src.keys() == ["bias", "weight"] and src.shape("weight") == (2, 3)
    assert torch.equal(as_checkpoint({"w": torch.zeros(1)}).get("w"), torch.zeros(1))
    with pytest.raises(
        ValueError,
        match=r"model must be a checkpoint path, an nn.Module or a state dict of tensors, "
        r"got int",
    ):
        as_checkpoint(3)
    with pytest.raises(ValueError, match=r"tensor 'nope' is not in <Linear> \(2 tensors\)"):
        src.get("nope")


def test_missing_and_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*missing' does not exist"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no model.safetensors or model.safetensors.index.json; found: notes.txt"):
        open_checkpoint(tmp_path / "empty")
    save_file({"w": torch.randn(64, 64)}, tmp_path / "good.safetensors")
    blob = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
    with pytest.raises(
        ValueError,
        match=r"'.*cut.safetensors' is truncated: "
        r"its tensors need \d+ bytes, the file has \d+",
    ):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(
        ValueError,
        match=r"'.*junk.safetensors' is corrupted: "
        r"its safetensors header is not valid JSON",
    ):
        open_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"'.*tiny.safetensors' is not a safetensors file"):
        open_checkpoint(tmp_path / "tiny.safetensors")
    write_checkpoint(tmp_path / "sh", _state(), max_shard_bytes=64)
    (tmp_path / "sh" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard '.*model-00002-of-00003.safetensors' named by"):
        open_checkpoint(tmp_path / "sh")
    assert open_checkpoint(tmp_path / "good.safetensors").keys() == ["w"]


def test_writer_is_atomic_and_refuses_existing_output(tmp_path):
    write_checkpoint(tmp_path / "out", {"a": torch.ones(2)})
    with pytest.raises(FileExistsError, match="already exists"):
        write_checkpoint(tmp_path / "out", {"a": torch.zeros(2)})

    def failing():
        yield "b", torch.zeros(3)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_checkpoint(tmp_path / "out", failing(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left
    assert torch.equal(open_checkpoint(tmp_path / "out").get("a"), torch.ones(2))
    write_checkpoint(tmp_path / "out", {"a": torch.zeros(2)}, force=True)
    assert torch.equal(open_checkpoint(tmp_path / "out").get("a"), torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 'a' is written twice"):
        write_checkpoint(tmp_path / "dup", [("a", torch.ones(1)), ("a", torch.ones(1))])
    assert not (tmp_path / "dup").exists()


def test_reads_every_dtype_and_shape_written_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "bool": torch.tensor([True, False, True]),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }
    save_file(sd, tmp_path / "all.safetensors")
    ckpt = open_checkpoint(tmp_path / "all.safetensors")
    for name, t in sd.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(
            got.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got,
            t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
        )
    write_checkpoint(tmp_path / "again", {k: ckpt.get(k) for k in ckpt.keys()})
    stock = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(stock[k].reshape(-1).view(torch.uint8), sd[k].reshape(-1).view(torch.uint8)) for k in sd)
