"""rankwise sweep: one calibration, every budget allocated and measured; the saved keep equals a compress run."""

import json
import re

import pytest
import torch

import rankwise
from rankwise.cli import main
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import perplexity
from rankwise.pipeline import Pipeline
from rankwise.sweep import spearman

from _tiny_models import save_model_dir, tiny_llama, tree_digest

FAST = ["--seq-len", "32", "--calib-tokens", "256"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), tmp_path_factory.mktemp("m") / "llama")


def test_sweep_calibrates_once_and_its_saved_keep_equals_compress(llama_dir, tmp_path, capsys, monkeypatch):
    digest = tree_digest(llama_dir)
    calls = []
    real = Pipeline.calibrate
    monkeypatch.setattr(Pipeline, "calibrate", lambda self, *a: (calls.append(1), real(self, *a))[1])
    assert (
        main(
            [
                "sweep",
                str(llama_dir),
                "--keep",
                "0.5",
                "0.9",
                "0.7",
                "--eval",
                "--eval-tokens",
                "512",
                "--save",
                "0.7",
                "--out",
                str(tmp_path / "s"),
                *FAST,
            ]
        )
        == 0
    )
    assert calls == [1]
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    rows = doc["rows"]
    assert [r["keep"] for r in rows] == [0.9, 0.7, 0.5]
    for r in rows:
        assert 0.5 * r["keep"] * r["params_before"] < r["params_after"] <= r["keep"] * r["params_before"]
        assert re.search(rf"^ *{r['keep']} +{r['params_after']:,} ", out, re.M)
    losses = [r["predicted_loss"] for r in rows]
    assert losses[0] < losses[1] < losses[2]  # less kept, more predicted loss
    assert doc["spearman_predicted_vs_quality"] == pytest.approx(spearman(losses, [r["quality"] for r in rows]))
    assert (tmp_path / "s" / "sweep.csv").read_text().splitlines()[
        0
    ] == "keep,params_before,params_after,predicted_loss,quality"

    assert main(["compress", str(llama_dir), "--keep", "0.7", "--out", str(tmp_path / "c"), *FAST]) == 0
    saved = tmp_path / "s" / "keep-0.7"
    assert (saved / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()
    model = rankwise.load(saved)
    tokenizer = rankwise.io.models.load_tokenizer(llama_dir)
    ids = token_sequences(tokenizer, builtin_text("eval"), 512, 1, what="evaluation")
    assert perplexity(model, ids, progress=False) == pytest.approx(rows[1]["quality"], rel=1e-6)
    assert tree_digest(llama_dir) == digest and not (tmp_path / "s.rankwise-run").exists()


def sweep_09_06(model, out, *extra) -> int:
    """``rankwise sweep MODEL --keep 0.9 0.6 --eval`` (512 tokens) into ``out``, plus ``extra`` options."""
    argv = ["sweep", str(model), "--keep", "0.9", "0.6", "--eval", "--eval-tokens", "512", *extra]
    return main([*argv, "--out", str(out), *FAST])


def test_out_best_writes_the_smallest_keep_within_the_bound(llama_dir, tmp_path, capsys):
    assert sweep_09_06(llama_dir, tmp_path / "s") == 0
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    bound = rows[0]["quality"] * (1 + 1e-9)  # only keep 0.9 is within it (keep 0.6 is worse)
    assert rows[1]["quality"] > bound
    assert sweep_09_06(llama_dir, tmp_path / "b", "--out-best", str(bound)) == 0
    assert [p.name for p in sorted((tmp_path / "b").iterdir())] == ["keep-0.9", "sweep.csv", "sweep.json"]
    capsys.readouterr()
    assert sweep_09_06(llama_dir, tmp_path / "n", "--out-best", "1.0") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"rankwise sweep: no swept keep reaches perplexity <= 1.0 \(best [\d.]+ at keep 0.9\); no model written", err
    )
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["sweep.csv", "sweep.json"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep", "0.8", "1.5"], r"keep must be a fraction in \(0, 1\], got 1\.5"),
        (["--keep", "0.8", "0.8"], r"keep 0\.8 is given twice"),
        (["--keep", "0.8", "--save", "0.7"], r"--save 0\.7 is not one of the swept keeps \(0\.8\)"),
        (["--keep", "0.8", "--out-best", "20"], r"--out-best needs --eval \(it chooses by measured quality\)"),
    ],
)
def test_bad_sweep_input_is_one_line_and_writes_nothing(llama_dir, tmp_path, capsys, argv, message):
    assert main(["sweep", str(llama_dir), *argv, "--out", str(tmp_path / "s"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(rf"rankwise sweep: error: {message}", err[0]), err
    assert list(tmp_path.iterdir()) == []


def test_spearman_against_a_direct_computation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3)
    a, b = torch.tensor([0, 1.5, 1.5, 3]), torch.tensor([0.0, 1, 2, 3])
    expected = float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm()))
    assert spearman([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(expected)
