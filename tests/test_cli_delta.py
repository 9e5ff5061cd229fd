"""Tests for `rankwise delta extract/apply`: file round-trip, budgets, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from rankwise.cli import main  # noqa: E402
from rankwise.peft_export import load_peft  # noqa: E402

from test_delta import K, finetune, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = tiny_llama()
    ft, deltas = finetune(base)
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    return root / "base", root / "ft", ft, deltas


def run(argv, capsys):
    capsys.readouterr()  # drop what the test printed before (save_pretrained's progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_save_apply_round_trip(pair, tmp_path, capsys):
    base, ft_dir, ft, deltas = pair
    code, out, _ = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "adapter", "--rank", K], capsys)
    assert code == 0 and "14 LoRA layers (ranks 3..3)" in out and "1 tensors stored exactly" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == K
    assert config["target_modules"] == sorted(deltas) and config["modules_to_save"] == ["model.norm"]
    code, out, _ = run(["delta", "apply", base, tmp_path / "adapter", "--out", tmp_path / "merged"], capsys)
    assert code == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    for name, value in ft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-13, msg=name)


def test_keep_budget_through_the_cli(pair, tmp_path, capsys):
    base, ft_dir, _, deltas = pair
    argv = ["delta", "extract", base, ft_dir, "--out", tmp_path / "a", "--keep", "0.05", "--skip-other"]
    code, _, _ = run(argv, capsys)
    assert code == 0
    delta = load_peft(tmp_path / "a")
    assert delta.exact == {}
    assert 0 < delta.num_params <= 0.05 * sum(D.numel() for D in deltas.values())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for module, r in config["rank_pattern"].items():  # every layer's scaling alpha / r is exactly 1
        assert config["alpha_pattern"][module] == r == delta.ranks[module]


def _assert_usage_error(code, err, message):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rankwise delta: error: ")
    assert message in err


def test_mismatched_models_name_the_tensor(pair, tmp_path, capsys):
    base, _, _, _ = pair
    other = tiny_llama(intermediate_size=40)
    other.save_pretrained(tmp_path / "other")
    code, _, err = run(["delta", "extract", base, tmp_path / "other", "--out", tmp_path / "a"], capsys)
    _assert_usage_error(
        code, err, "tensor 'model.layers.0.mlp.down_proj.weight' has shape (32, 48) in base, (32, 40) in finetuned"
    )
    assert not (tmp_path / "a").exists()


def test_rank_too_large_names_the_layer(pair, tmp_path, capsys):
    base, ft_dir, _, _ = pair
    code, _, err = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "a", "--rank", "40"], capsys)
    _assert_usage_error(
        code, err, "rank 40 is larger than layer 'model.layers.0.mlp.down_proj' allows (max 32 for its 32x48 delta)"
    )
    assert list(tmp_path.iterdir()) == []


def test_missing_paths(pair, tmp_path, capsys):
    base, ft_dir, _, _ = pair
    code, _, err = run(["delta", "extract", base, tmp_path / "nope", "--out", tmp_path / "a"], capsys)
    _assert_usage_error(code, err, f"model '{tmp_path / 'nope'}' not found")
    code, _, err = run(["delta", "apply", base, tmp_path / "nope", "--out", tmp_path / "m"], capsys)
    _assert_usage_error(code, err, f"delta directory '{tmp_path / 'nope'}' has no adapter_config.json")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(pair, tmp_path, capsys):
    base, ft_dir, _, _ = pair
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    code, _, err = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "a", "--rank", "2"], capsys)
    _assert_usage_error(code, err, f"output directory '{tmp_path / 'a'}' already exists; pass --force")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.txt"]
    code, _, _ = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "a", "--rank", "2", "--force"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "rankwise_delta.json",
    ]
    code, _, err = run(["delta", "apply", base, tmp_path / "a", "--out", tmp_path / "a"], capsys)
    _assert_usage_error(code, err, "already exists; pass --force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no partial directories left behind


def test_bad_budget_values(pair, tmp_path, capsys):
    base, ft_dir, _, _ = pair
    code, _, err = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "a", "--energy", "0"], capsys)
    _assert_usage_error(code, err, "energy must be a fraction in (0, 1], got 0.0")
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive budget flags
        main(["delta", "extract", str(base), str(ft_dir), "--out", str(tmp_path / "a"), "--rank", "2", "--keep", "0.5"])
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_include_exclude_save_module_like_mergekit(pair, tmp_path, capsys):
    base, ft_dir, ft, _ = pair
    code, out, err = run(
        [
            "delta",
            "extract",
            base,
            ft_dir,
            "--out",
            tmp_path / "a",
            "--rank",
            "3",
            "--include",
            "mlp",
            "--exclude",
            r"layers\.0\.",
            "--save-module",
            "lm_head",
        ],
        capsys,
    )
    assert code == 0 and "extract layers" in err  # the progress bar
    assert "3 LoRA layers (ranks 3..3)" in out and "full-rank modules: lm_head, model.layers.0.mlp.down_proj" in out
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert config["modules_to_save"][0] == "lm_head" and "model.layers.1.self_attn.q_proj" in config["modules_to_save"]
    code, _, _ = run(["delta", "apply", base, tmp_path / "a", "--out", tmp_path / "merged"], capsys)
    assert code == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    for name, value in ft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-13, msg=name)
    code, _, err = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "b", "--save-module", "nope"], capsys)
    _assert_usage_error(code, err, "save_modules entry 'nope' names no module of the base model")
    code, _, err = run(["delta", "extract", base, ft_dir, "--out", tmp_path / "b", "--include", "["], capsys)
    _assert_usage_error(code, err, "include='[' is not a valid regular expression")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "merged"]
