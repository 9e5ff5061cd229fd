"""`rankwise merge`: results on disk equal the library's formulas.

Bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from rankwise.cli import main
from rankwise.io import open_checkpoint, write_checkpoint


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"l.weight": torch.randn(6, 4, generator=g), "l.bias": torch.randn(6, generator=g)}
    write_checkpoint(tmp_path / "base", base, config={"model_type": "toy"})
    paths = []
    for i in range(3):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        write_checkpoint(tmp_path / f"ft{i}", ft, max_shard_bytes=64)  # sharded inputs
        paths.append(str(tmp_path / f"ft{i}"))
    return tmp_path, base, paths


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_task_arithmetic_writes_the_formula(models, capsys):
    root, base, paths = models
    rc = main(
        [
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            str(root / "base"),
            *paths[:2],
            "--weights",
            "1",
            "0.5",
            "--lambda",
            "0.5",
            "--out",
            str(root / "out"),
        ]
    )
    assert rc == 0
    assert (
        capsys.readouterr().out.strip()
        == f"wrote {root / 'out'}: task_arithmetic merge of 2 model(s) onto {root / 'base'}"
    )
    out = open_checkpoint(root / "out")
    assert json.loads((root / "out" / "config.json").read_text()) == {"model_type": "toy"}
    ft = [open_checkpoint(p) for p in paths[:2]]
    for k in base:
        expected = base[k] + 0.5 * ((ft[0].get(k) - base[k]) + 0.5 * (ft[1].get(k) - base[k]))
        assert torch.allclose(out.get(k), expected, rtol=0, atol=1e-6)


def test_cli_mergekit_config_equals_method_flags(models, capsys):
    root, base, paths = models
    cfg = {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "parameters": {"density": 0.5, "normalize": True},
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, (1.0, 0.5, 2.0))],
        "tokenizer_source": "base",
    }
    (root / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / "c.yml"), "--out", str(root / "a")]) == 0
    assert "note: 'tokenizer_source' is ignored" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--method",
                "ties",
                "--base",
                str(root / "base"),
                *paths,
                "--weights",
                "1",
                "0.5",
                "2",
                "--density",
                "0.5",
                "--out",
                str(root / "b"),
            ]
        )
        == 0
    )
    a, b = open_checkpoint(root / "a"), open_checkpoint(root / "b")
    assert all(torch.equal(a.get(k), b.get(k)) for k in base)
    assert not torch.equal(a.get("l.weight"), base["l.weight"])
    # --force replaces an existing output
    assert main(["merge", "--method", "linear", *paths, "--out", str(root / "a"), "--force"]) == 0
    lin = open_checkpoint(root / "a").get("l.bias")
    assert torch.allclose(lin, sum(open_checkpoint(p).get("l.bias") for p in paths) / 3, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--method", "ties", "--base", "{base}", "{ft0}", "{bad}"],
            "tensor 'l.weight' has shape (6, 4) in base ({base}) but (4, 6) in models[1] ({bad})",
        ),
        (
            ["--method", "model_stock", "--base", "{base}", "{ft0}", "{ft1}"],
            "merge method 'model_stock' needs at least 3 fine-tuned models besides the base, got 2",
        ),
        (["--method", "soup", "{ft0}"], "unknown merge method 'soup'; known: "),
        (
            ["--method", "rebasin", "{ft0}", "{ft1}"],
            "merge method 'rebasin' works on nn.Modules (it reads the architecture or runs forward passes): "
            "call rankwise.merge(...) from Python with modules, not paths or state dicts",
        ),
        (
            ["--method", "linear", "{ft0}", "--density", "0.5"],
            "unknown option(s) 'density' for merge method 'linear'; accepted: normalize, weights",
        ),
        (
            ["--method", "ties", "--base", "{base}", "{ft0}", "--density", "1.5"],
            "merging tensor 'l.bias': density must be in (0, 1], got 1.5",
        ),
        (
            ["--method", "tsv", "--base", "{base}", "{ft0}", "--rank", "5"],
            "merging tensor 'l.weight': rank=5 is out of range; accepted: 1 <= rank <= 4 for this shape",
        ),
        (["--method", "linear", "{root}/missing"], "checkpoint '{root}/missing' does not exist"),
        (["{root}/bad.yml"], "unknown key(s) 'lora' in '{root}/bad.yml'; accepted: base_model"),
        (
            ["{root}/bad.yml", "--lambda", "2"],
            "give either --method M --base BASE MODEL... or a single mergekit CONFIG.yml",
        ),
        (["--method", "linear", "{ft0}", "{trunc}"], "'{trunc}/model.safetensors' is truncated"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_output(models, capsys, argv, message):
    root, _, paths = models
    write_checkpoint(root / "bad", {"l.weight": torch.zeros(4, 6), "l.bias": torch.zeros(6)})
    write_checkpoint(root / "trunc", {"l.weight": torch.zeros(6, 4), "l.bias": torch.zeros(6)})
    blob = (root / "trunc" / "model.safetensors").read_bytes()
    (root / "trunc" / "model.safetensors").write_bytes(blob[:-8])
    (root / "bad.yml").write_text(
        yaml.safe_dump({"merge_method": "linear", "lora": 1, "models": [{"model": paths[0]}]})
    )
    names = {
        "base": str(root / "base"),
        "ft0": paths[0],
        "ft1": paths[1],
        "bad": str(root / "bad"),
        "trunc": str(root / "trunc"),
        "root": str(root),
    }
    before = _snapshot(root)
    rc = main(["merge", *[a.format(**names) for a in argv], "--out", str(root / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("rankwise merge: error: ")
    assert message.format(**names) in err
    assert _snapshot(root) == before  # inputs untouched, no output or partial directory


def test_cli_refuses_existing_output_before_reading_models(models, capsys):
    root, _, paths = models
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    rc = main(["merge", "--method", "linear", *paths, "--out", str(root / "out")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"rankwise merge: error: output directory '{root / 'out'}' already exists; pass --force to overwrite it"
    )
    assert (root / "out" / "keep.txt").read_text() == "mine"
