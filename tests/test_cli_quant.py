"""`rankwise compress --bits / --method qlr / --bits-per-weight / --size`: same as the API, exact reloads, honest
bytes, and bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.cli import main
from rankwise.io.models import load_model
from rankwise.layers import QuantLinear, QuantLowRankLinear
from rankwise.quantize import module_bytes

from _tiny_models import save_model_dir, tiny_llama, token_ids, tree_digest

FAST = ["--seq-len", "32", "--calib-tokens", "256"]
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm lines (loading, calibration, quantization) before the error


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), tmp_path_factory.mktemp("m") / "llama")


def _check_reload(out, capsys_out: str):
    model = rankwise.load(out)
    ids = token_ids(2, 20)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, expected)
    counted = int(re.search(r"whole model ([\d,]+) bytes", capsys_out).group(1).replace(",", ""))
    on_disk = (out / "model.safetensors").stat().st_size
    assert counted == module_bytes(model)
    assert abs(on_disk - counted) < 0.01 * counted
    return model


def test_lowrank_with_quantized_factors(llama_dir, tmp_path, capsys):
    digest = tree_digest(llama_dir)
    out = tmp_path / "q4"
    assert (
        main(
            ["compress", str(llama_dir), "--keep", "0.6", "--bits", "4", "--group-size", "32", "--out", str(out), *FAST]
        )
        == 0
    )
    text = capsys.readouterr().out
    model = _check_reload(out, text)
    layers = [m for m in model.modules() if isinstance(m, QuantLowRankLinear)]
    assert layers and all(m.down.bits == 4 and m.up.group_size == 32 for m in layers)
    targets = [m for n, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", n)]
    kept = [m for m in targets if isinstance(m, QuantLinear)]  # left dense by the allocator, quantized as they are
    assert len(targets) == 14 and len(kept) + len(layers) == 14 and all(m.bits == 4 for m in kept)
    assert "whiten low-rank at keep 0.6 + 4-bit factors" in text
    assert main(["info", str(out)]) == 0
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, QuantLowRankLinear)}
    info = capsys.readouterr().out
    assert all(re.search(rf"^{re.escape(n)} +\d+x\d+ +{r}@4b ", info, re.M) for n, r in ranks.items())
    assert tree_digest(llama_dir) == digest


def test_qlr(llama_dir, tmp_path, capsys):
    out = tmp_path / "qlr"
    assert (
        main(
            [
                "compress",
                str(llama_dir),
                "--method",
                "qlr",
                "--bits",
                "2",
                "--rank",
                "4",
                "--group-size",
                "32",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    model = _check_reload(out, capsys.readouterr().out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.bits == 2 and m.correction_rank == 4 for m in layers)
    assert main(["info", str(out)]) == 0
    rows = re.findall(r"^model\.layers\.\d\.\S+ +\d+x\d+ +(\S+) ", capsys.readouterr().out, re.M)
    assert rows == ["2b+r4"] * 14


def test_bits_per_weight_budget_is_met(llama_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compress", str(llama_dir), "--bits-per-weight", "3.0", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    model = _check_reload(out, text)
    bpw = float(re.search(r"\(([\d.]+) bits per weight, everything counted\)", text).group(1))
    targets = [m for n, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", n)]
    stored = sum(module_bytes(m) for m in targets)
    assert len(targets) == 14 and all(isinstance(m, (QuantLinear, QuantLowRankLinear)) for m in targets)
    assert bpw == pytest.approx(8 * stored / 18432, abs=5e-4) and bpw <= 3.0  # 2 blocks of 9216 weights


def test_size_budget_is_met(llama_dir, tmp_path, capsys):
    out = tmp_path / "s"
    dense = module_bytes(load_model(llama_dir)[0])
    size = dense - 18432 * 4 + 18432 * 3 // 8  # the block linears at 3 bits per weight, the rest untouched
    assert main(["compress", str(llama_dir), "--size", str(size), "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    _check_reload(out, text)
    assert int(re.search(r"whole model ([\d,]+) bytes", text).group(1).replace(",", "")) <= size


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits must be one of 2, 3, 4, 8, got 5"),
        (
            ["--method", "qlr", "--bits", "3"],
            "--method qlr needs --rank R, an int >= 1 (the correction's rank), got None",
        ),
        (
            ["--rank", "4", "--bits", "3"],
            "--rank applies to --method qlr (the factorized layers' ranks come from --keep)",
        ),
        (["--bits", "4", "--group-size", "48"], "group_size must be one of 32, 64, 128, got 48"),
        (
            ["--size", "60XB"],
            "size must be a number of bytes with an optional unit B, KB, MB, GB, KiB, MiB, GiB (e.g. 60MB), got '60XB'",
        ),
        (["--size", "1MB", "--bits", "4"], "a byte budget chooses bit widths and corrections per layer; drop --bits"),
        (["--size", "1MB", "--bits-per-weight", "3"], "give one byte budget: --bits-per-weight or --size, not both"),
        (
            ["--bits", "4", "--include-head"],
            "--include-head is not supported by quantizing runs (--bits, --method qlr, --bits-per-weight, --size); "
            "accepted: a low-rank compression without them",
        ),
        (
            ["--bits", "4", "--sequential"],
            "--sequential is not supported by quantizing runs (--bits, --method qlr, --bits-per-weight, --size); "
            "accepted: a low-rank compression without them",
        ),
        (
            ["--size", "1MB"],
            "size 1,000,000 bytes is below the 3,907,456 bytes the model's untouched tensors "
            "(embeddings, norms, layers not quantized) need; the minimum is more than 3,907,456",
        ),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(llama_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["compress", str(llama_dir), "--out", str(out), *FAST, *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert err == [f"rankwise compress: error: {message}"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bits_per_weight_below_minimum_names_it_and_the_minimum_works(llama_dir, tmp_path, capsys):
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "bad"), *FAST, "--bits-per-weight", "1.0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    m = re.fullmatch(
        r"rankwise compress: error: the budget is below the smallest quantization of every layer; "
        r"the minimum is (\d\.\d{3}) bits per weight",
        err[0],
    )
    assert len(err) == 1 and m and not (tmp_path / "bad").exists()
    minimum = float(m.group(1))
    assert 1.0 < minimum < 3.0
    assert (
        main(
            [
                "compress",
                str(llama_dir),
                "--out",
                str(tmp_path / "min"),
                *FAST,
                "--bits-per-weight",
                str(minimum + 0.001),
            ]
        )
        == 0
    )


def test_budget_run_equals_the_in_memory_budget(llama_dir, tmp_path):
    """The block-by-block run (statistics per block, candidates rebuilt at write time) chooses and stores what
    the in-memory allocation over a whole-model calibration does."""
    from rankwise.calibrate import collect_stats
    from rankwise.compress import CompressConfig
    from rankwise.quant_budget import quantize_to_budget_
    from rankwise.quant_checkpoint import compress_quantized
    from rankwise.targets import find_targets

    calib, config = token_ids(8, 32, seed=4), CompressConfig(fisher_seqs=4)
    report = compress_quantized(
        llama_dir, tmp_path / "b", calib, config=config, bits_per_weight=3.0, device="cpu", progress=False
    )
    memory = load_model(llama_dir)[0]
    targets = find_targets(memory)
    stats = collect_stats(memory, targets, calib, fisher_seqs=4, seed=config.seed, progress=False)
    ref = quantize_to_budget_(memory, list(targets), stats, bits_per_weight=3.0, progress=False)
    assert [(r.name, r.kind, r.config, r.bytes) for r in report.layers] == [
        (r.name, r.kind, r.config, r.bytes) for r in ref
    ]
    assert len({(r.kind, r.config["bits"], r.config["group_size"]) for r in ref}) >= 2  # a mix, not one width
    reloaded = rankwise.load(tmp_path / "b")
    for name in targets:
        torch.testing.assert_close(
            reloaded.get_submodule(name).dense_weight(), memory.get_submodule(name).dense_weight(), rtol=0, atol=1e-6
        )
    assert report.target_bytes == sum(r.bytes for r in ref)


def test_a_quantizing_run_holds_one_block(llama_dir, tmp_path, monkeypatch):
    """While block i is written, every other block's weights and the dense layers it replaced are on the meta
    device (not held: the run's memory is one block)."""
    from rankwise.streamed import StreamedRun

    real, seen = StreamedRun.write_block, []

    def check(self, writer, i):
        held = [
            f"{j}.{p}"
            for j, block in enumerate(self.source.stack)
            if j != i
            for p, t in block.named_parameters()
            if t.device.type != "meta"
        ]
        replaced = [n for n, layer in self.targets.items() if layer.weight.device.type != "meta"]
        seen.append((i, held, replaced))
        return real(self, writer, i)

    monkeypatch.setattr(StreamedRun, "write_block", check)
    for k, argv in enumerate((["--bits-per-weight", "3.0"], ["--keep", "0.6", "--bits", "4"])):
        seen.clear()
        assert main(["compress", str(llama_dir), "--out", str(tmp_path / str(k)), *FAST, *argv]) == 0
        assert seen == [(0, [], []), (1, [], [])]


def test_interrupted_quantizing_run_resumes_to_the_same_output(llama_dir, tmp_path, capsys, monkeypatch):
    from rankwise.quant_checkpoint import QuantPipeline

    argv = ["--bits-per-weight", "3.0", *FAST]
    whole = tmp_path / "whole"
    assert main(["compress", str(llama_dir), "--out", str(whole), *argv]) == 0
    real = QuantPipeline._factorize_block

    def interrupt_at_block_1(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, *args)

    monkeypatch.setattr(QuantPipeline, "_factorize_block", interrupt_at_block_1)
    capsys.readouterr()
    out = tmp_path / "c"
    assert main(["compress", str(llama_dir), "--out", str(out), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert err == [
        f"rankwise compress: interrupted; no output was written. The finished blocks are kept in "
        f"'{tmp_path / 'c.rankwise-run'}': rerun with --resume to continue"
    ]
    assert (tmp_path / "c.rankwise-run" / "options-0.pt").is_file() and not out.exists()
    monkeypatch.setattr(QuantPipeline, "_factorize_block", real)
    assert main(["compress", str(llama_dir), "--out", str(out), "--resume", *FAST, "--bits-per-weight", "3.5"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(err) == 1 and re.fullmatch(
        r"rankwise compress: error: --resume: '.*/c.rankwise-run' is an interrupted run with a different "
        r"bits_per_weight: 3.0 there, 3.5 now",
        err[0],
    )
    built = []
    monkeypatch.setattr(QuantPipeline, "_factorize_block", lambda self, i, *a: (built.append(i), real(self, i, *a)))
    assert main(["compress", str(llama_dir), "--out", str(out), "--resume", *argv]) == 0
    assert built == [1]  # block 0's candidates came from the interrupted run
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not (tmp_path / "c.rankwise-run").exists()
