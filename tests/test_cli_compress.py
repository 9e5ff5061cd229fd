"""`rankwise compress / eval / info` on tiny models.

Same result as the API, and every bad input gives one line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import rankwise
import rankwise.compress
from rankwise.cli import main
from rankwise.compress import CompressConfig, compress_
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import perplexity
from rankwise.io.models import load_model

from _tiny_models import save_model_dir, tiny_bert, tiny_llama, token_ids, tree_digest

FAST = ["--seq-len", "32", "--calib-tokens", "256"]  # 8 calibration sequences of 32 tokens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_model_dir(tiny_bert(), tmp_path_factory.mktemp("m") / "bert")


@pytest.fixture(scope="module")
def compressed(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "c"
    assert main(["compress", str(llama_dir), "--keep", "0.6", "--out", str(out), *FAST]) == 0
    return out


def test_compress_matches_the_api_and_leaves_input_untouched(llama_dir, compressed, tmp_path):
    digest = tree_digest(llama_dir)
    model, tokenizer, _ = load_model(llama_dir)
    config = CompressConfig(keep=0.6, seq_len=32, calib_seqs=8)
    report = compress_(model, config, token_sequences(tokenizer, builtin_text("calib"), 32, 8), progress=False)
    reloaded = rankwise.load(compressed)
    assert {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, rankwise.LowRankLinear)} == report.ranks
    ids = token_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sorted(p.name for p in compressed.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "rankwise_report.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]  # every file of the input but its weights, config.json rewritten, a model card added
    for name in (
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ):
        assert (compressed / name).read_bytes() == (llama_dir / name).read_bytes()
    assert tree_digest(llama_dir) == digest


def test_compress_prints_summary(llama_dir, tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                str(llama_dir),
                "--keep",
                "0.9",
                "--method",
                "svd",
                "--allocate",
                "uniform",
                "--out",
                str(tmp_path / "c"),
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(
        r"params 18,432 -> \d[\d,]* \(kept 0\.\d+, target 0\.9\); "
        r"method=svd allocate=uniform update=False sequential=False",
        out,
    )
    assert f"saved {tmp_path / 'c'}" in out


def test_info_lists_every_layer_and_totals(compressed, capsys):
    assert main(["info", str(compressed)]) == 0
    out = capsys.readouterr().out
    from rankwise.io.checkpoint import layer_table

    rows, totals = layer_table(compressed)
    assert len(rows) == len(re.findall(r"^model\.layers\.\d\.\S+ +\d+x\d+ +\d+ ", out, re.M)) > 0
    for name, (m, n), rank, after, before in rows:
        assert re.search(rf"^{re.escape(name)} +{m}x{n} +{rank} +{after:,} +{before:,} ", out, re.M)
    ratio = totals["layers_after"] / totals["layers_before"]
    assert (
        f"factorized layers: {totals['layers_after']:,} / {totals['layers_before']:,} params (ratio {ratio:.3f})" in out
    )
    report = json.loads((compressed / "rankwise_report.json").read_text())
    kept = report["params_after"] / report["params_before"]
    assert (
        f"targeted layers:   {report['params_after']:,} / {report['params_before']:,} params (kept {kept:.3f};" in out
    )
    assert abs(kept - 0.6) < 0.05
    assert "compressed with keep=0.6 method=whiten" in out


def test_eval_perplexity_matches_the_api(compressed, llama_dir, capsys):
    assert main(["eval", str(compressed), "--tokens", "128", "--seq-len", "32", "--ref", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    model, tokenizer, _ = load_model(compressed)
    ids = token_sequences(tokenizer, builtin_text("eval"), 32, 4)
    ppl = perplexity(model, ids, progress=False)
    ref = perplexity(load_model(llama_dir)[0], ids, progress=False)
    assert f"perplexity {ppl:.3f} on 128 tokens (4 x 32) of built-in held-out text" in out
    assert f"reference perplexity {ref:.3f}; ratio {ppl / ref:.3f}" in out


def test_encoder_compress_and_eval_against_ref(bert_dir, tmp_path, capsys):
    out_dir = tmp_path / "c"
    assert main(["compress", str(bert_dir), "--keep", "0.8", "--out", str(out_dir), *FAST]) == 0
    text = tmp_path / "s.txt"
    text.write_text("The first sentence is about cats. The second sentence is about dogs and their owners.")
    capsys.readouterr()
    assert main(["eval", str(out_dir), "--ref", str(bert_dir), "--text", str(text)]) == 0
    m = re.search(r"mean cosine similarity to \S+ (\d\.\d{5}) over 2 sentences", capsys.readouterr().out)
    assert m and 0.5 < float(m.group(1)) < 1.0


PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[")


def run_bad(argv, capsys, match, *, after_loading=False):
    """Run the CLI expecting exit 2 with exactly one stderr line matching ``match``.

    Input caught before any weight is read gives nothing else on stderr; an error found once the
    model is loaded (``after_loading``) may follow transformers' "Loading weights" progress bar.
    """
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if after_loading:
        err = [line for line in err if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(err) == 1 and re.search(match, err[0]), err
    return err[0]


def no_output(parent: Path, name: str = "c") -> bool:
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_existing_output_refused_without_force(llama_dir, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep me")
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        r"^rankwise compress: error: output directory '.*/c' already exists; pass --force to overwrite it$",
    )
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_keep_out_of_range(llama_dir, tmp_path, capsys, keep):
    run_bad(
        ["compress", str(llama_dir), "--keep", keep, "--out", str(tmp_path / "c")],
        capsys,
        rf"^rankwise compress: error: keep must be a fraction in \(0, 1\], got {re.escape(str(float(keep)))}$",
    )
    assert no_output(tmp_path)


def test_missing_model(tmp_path, capsys):
    run_bad(
        ["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "c")],
        capsys,
        r"model '.*/nope' not found: expected a transformers model directory",
    )
    assert no_output(tmp_path)


def test_allocate_takes_the_old_name_fisher_as_an_alias(tmp_path, capsys):
    # the config is validated before the model is read: "fisher" passes, an unknown name does not
    argv = ["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "c"), "--allocate"]
    run_bad([*argv, "fisher"], capsys, r"^rankwise compress: error: model '.*/nope' not found")
    unknown = r"^rankwise compress: error: unknown allocator 'greedy'; known: loss-aware, uniform$"
    run_bad([*argv, "greedy"], capsys, unknown)
    assert no_output(tmp_path)


def test_truncated_safetensors_is_named(llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llama_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    digest = tree_digest(bad)
    run_bad(
        ["compress", str(bad), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        rf"corrupted or truncated safetensors file '{re.escape(str(bad / 'model.safetensors'))}'",
    )
    assert no_output(tmp_path) and tree_digest(bad) == digest


def test_calibration_text_too_short(llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), "--calib", str(short), *FAST],
        capsys,
        r"calibration text too short: need 256 tokens \(8 x 32\), got \d+$",
    )
    assert no_output(tmp_path)


def test_include_matching_nothing(llama_dir, tmp_path, capsys):
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), "--include", "no_such_layer", *FAST],
        capsys,
        r"include='no_such_layer' matches no nn.Linear/Conv1D module name",
        after_loading=True,
    )
    assert no_output(tmp_path)


def test_nan_weight_is_named(tmp_path, capsys):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    src = save_model_dir(model, tmp_path / "nan")
    run_bad(
        ["compress", str(src), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        r"^rankwise compress: error: tensor 'model.layers.0.self_attn.v_proj.weight' of '.*/nan' "
        r"holds 1 NaN/Inf values; only finite weights can be compressed$",
        after_loading=True,
    )
    assert no_output(tmp_path) and not (tmp_path / "c.rankwise-run").exists()


def test_interrupted_run_resumes_to_the_same_output(llama_dir, tmp_path, capsys, monkeypatch):
    from rankwise.pipeline import Pipeline

    whole = tmp_path / "whole"
    assert main(["compress", str(llama_dir), "--out", str(whole), *FAST]) == 0
    real = Pipeline._factorize_block

    def interrupt_at_block_1(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, *args)

    monkeypatch.setattr(Pipeline, "_factorize_block", interrupt_at_block_1)
    capsys.readouterr()
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "c"), *FAST]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert err == [
        f"rankwise compress: interrupted; no output was written. The finished blocks are kept in "
        f"'{tmp_path / 'c.rankwise-run'}': rerun with --resume to continue"
    ]
    assert no_output(tmp_path) and (tmp_path / "c.rankwise-run" / "factors-0.pt").is_file()
    assert not (tmp_path / "c.rankwise-run" / "factors-1.pt").exists()
    monkeypatch.setattr(Pipeline, "_factorize_block", real)
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        r"^rankwise compress: error: '.*/c.rankwise-run' holds an interrupted run: pass --resume to continue it or "
        r"--force to start over$",
        after_loading=True,
    )
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), "--keep", "0.7", "--resume", *FAST],
        capsys,
        r"^rankwise compress: error: --resume: '.*/c.rankwise-run' is an interrupted run with a different "
        r"config.keep: 0.8 there, 0.7 now$",
        after_loading=True,
    )
    factorized = []
    monkeypatch.setattr(Pipeline, "_factorize_block", lambda self, i, *a: (factorized.append(i), real(self, i, *a)))
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "c"), "--resume", *FAST]) == 0
    assert factorized == [1]  # block 0's factors came from the interrupted run
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not (tmp_path / "c.rankwise-run").exists()


def test_ctrl_c_while_writing_leaves_nothing(llama_dir, tmp_path, capsys, monkeypatch):
    from rankwise.io.lazy import ShardedWriter

    real = ShardedWriter.close

    def write_then_interrupt(self):
        real(self)
        assert (self.dir / "model.safetensors").is_file()  # interrupted with a partial output on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardedWriter, "close", write_then_interrupt)
    run_bad(
        ["compress", str(llama_dir), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        r"interrupted; no output was written",
        after_loading=True,
    )
    assert no_output(tmp_path)


def test_eval_and_info_bad_inputs(bert_dir, llama_dir, tmp_path, capsys):
    run_bad(["eval", str(bert_dir)], capsys, r"^rankwise eval: error: model '.*' is an encoder: pass --ref MODEL")
    run_bad(
        ["eval", str(llama_dir), "--text", str(tmp_path / "none.txt")], capsys, r"--text file '.*none.txt' not found$"
    )
    run_bad(["info", str(llama_dir)], capsys, r"^rankwise info: error: '.*' is not a rankwise directory")
    run_bad(["eval", str(llama_dir), "--tokens", "0"], capsys, r"--tokens must be an int >= 1, got 0$")
    assert sorted(os.listdir(tmp_path)) == []


def test_missing_shard_and_full_disk_are_named(tmp_path, capsys, monkeypatch):
    model = tiny_llama()
    src = tmp_path / "sharded"
    save_model_dir(model, src)  # with tokenizer files
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="60KB")  # the weights again, sharded
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    full_disk = tmp_path / "full"
    shutil.copytree(src, full_disk)
    shards[1].unlink()
    run_bad(
        ["compress", str(src), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        rf"^rankwise compress: error: shard '{re.escape(str(shards[1]))}' "
        r"named by '.*model.safetensors.index.json' does not exist$",
        after_loading=True,
    )
    assert no_output(tmp_path)
    import rankwise.workdir

    monkeypatch.setattr(
        rankwise.workdir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
    )
    run_bad(
        ["compress", str(full_disk), "--out", str(tmp_path / "c"), *FAST],
        capsys,
        r"^rankwise compress: error: not enough free disk under '.*' for the spilled statistics and the output: "
        r"0\.\d\d GiB needed, 0\.00 GiB free$",
        after_loading=True,
    )
    assert no_output(tmp_path) and not (tmp_path / "c.rankwise-run").exists()


def test_bfloat16_checkpoint_is_computed_in_float32_and_stored_in_bfloat16(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama().to(torch.bfloat16)
    bf16 = save_model_dir(model, tmp_path / "bf16")
    fp32 = save_model_dir(model.float(), tmp_path / "fp32")  # the same (bfloat16-exact) weights in float32
    for d in (bf16, fp32):
        assert main(["compress", str(d), "--out", str(d) + "-c", *FAST]) == 0
    a, b = load_file(str(bf16) + "-c/model.safetensors"), load_file(str(fp32) + "-c/model.safetensors")
    assert set(a) == set(b) and any(k.endswith("down.weight") for k in a)
    for k in a:
        assert a[k].dtype == torch.bfloat16 and b[k].dtype == torch.float32
        assert torch.equal(a[k], b[k].to(torch.bfloat16)), k


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu0", r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu0'"),
        pytest.param(
            "cuda",
            r"device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
    ],
)
def test_bad_device_is_named(llama_dir, tmp_path, capsys, device, message):
    run_bad(
        ["compress", str(llama_dir), "--device", device, "--out", str(tmp_path / "c"), *FAST],
        capsys,
        rf"^rankwise compress: error: {message}$",
    )
    assert no_output(tmp_path)
