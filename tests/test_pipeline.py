"""The block-by-block pipeline: its statistics and loss gradients equal a whole-model pass; the streamed checkpoint
path equals the in-memory one; sequential calibration sees the compressed blocks' outputs."""

import pytest
import torch

import rankwise
from rankwise.blocks import InMemorySource
from rankwise.calibrate import collect_stats
from rankwise.compress import CompressConfig, compress_, run_compression
from rankwise.metric import factorize, layer_cost
from rankwise.pipeline import Pipeline
from rankwise.streamed import StreamedRun, compress_checkpoint, run_dir
from rankwise.targets import block_stack, find_targets
from rankwise.workdir import WorkDir

from _tiny_models import (
    ARCHITECTURES,
    auto_class,
    save_model_dir,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_model,
    token_ids,
)

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def run_pipeline(model, config, calib, tmp_path):
    targets = find_targets(model)
    pipe = Pipeline(
        InMemorySource(model, block_stack(model)[0], "cpu"),
        targets,
        config,
        lambda W, st, name, cache: factorize(W, config, st, name, cache),
        lambda layer, f, st, name: layer_cost(layer, f, st, name, config.needs_loss_gradients),
        WorkDir(tmp_path / "work", {}),
        device="cpu",
        dtype=torch.float64,
        progress=False,
    )
    pipe.calibrate(calib)
    return pipe, targets


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_block_statistics_and_loss_gradients_equal_a_whole_model_pass(arch, tmp_path):
    model = BUILDERS[arch]().double().requires_grad_(False)
    calib = token_ids(6, 12, seed=1)
    config = CompressConfig(fisher_seqs=5)
    pipe, targets = run_pipeline(model, config, calib, tmp_path)
    ref = collect_stats(model, targets, calib, fisher_seqs=5, progress=False)
    for i, names in enumerate(pipe.groups):
        spilled = pipe.work.load(f"stats-{i}.pt")
        for name in names:
            st = spilled[name] if "leader" not in spilled[name] else spilled[spilled[name]["leader"]]
            assert int(st["count"]) == ref.inputs[name].count == 6 * 12
            torch.testing.assert_close(st["gram"], ref.inputs[name].gram, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st["abs_sum"], ref.inputs[name].abs_sum, rtol=1e-12, atol=1e-12)
    assert set(pipe.grad_sq) == set(targets)
    for name in targets:  # the recomputing backward gives the whole-model gradients up to round-off
        g, r = pipe.grad_sq[name], ref.out_grad_sq[name]
        assert float(r.sum()) > 0
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12 * float(r.max()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_checkpoint_equals_in_memory_compression(arch, tmp_path):
    src = save_model_dir(tiny_model(arch), tmp_path / "in")
    calib = token_ids(8, 16, seed=2)
    config = CompressConfig(keep=0.6, fisher_seqs=4, min_rank=2)
    report = compress_checkpoint(src, tmp_path / "out", config, calib, device="cpu", progress=False)
    auto = auto_class(arch)
    memory = auto.from_pretrained(src).eval()
    ref = compress_(memory, config, calib, progress=False)
    assert report.ranks == ref.ranks and len(report.ranks) > 0
    assert [dataclass_row(row) for row in report.layers] == [dataclass_row(row) for row in ref.layers]
    reloaded = auto.from_pretrained(tmp_path / "out").eval()  # stock transformers, after `import rankwise`
    assert isinstance(reloaded.get_submodule(next(iter(report.ranks))), rankwise.LowRankLinear)
    ids = token_ids(2, 10, seed=3)
    with torch.no_grad():
        a = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids))
        b = memory(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(a[0], b[0])  # logits of a causal LM, last hidden state of an encoder
    assert not (tmp_path / "out.rankwise-run").exists()


def test_a_streamed_run_holds_no_block_weights_once_written(tmp_path):
    """Each written block is freed, the dense layers it swapped out included (the run's target list still
    names them: holding their weights made memory grow by their bytes with every block written)."""
    src = save_model_dir(tiny_llama(), tmp_path / "in")
    calib, out = token_ids(4, 16, seed=2), tmp_path / "out"
    config = CompressConfig(keep=0.5, fisher_seqs=2, min_rank=2)
    with StreamedRun(src, run_dir(out), config, calib, device="cpu", progress=False) as run:
        report = run.write(
            out,
            False,
            lambda writer: run_compression(
                run.source, run.targets, config, calib, run.work, emit=run.block_writer(writer), progress=False
            ),
        )
        swapped = [n for n, r in report.ranks.items() if r is not None]
        held = [
            f"{n}.{p}"
            for n, layer in [*run.targets.items(), (run.source.stack_name, run.source.stack)]
            for p, t in layer.named_parameters()
            if t.device.type != "meta"
        ]
    assert len(swapped) >= 2 and held == []


def dataclass_row(layer):
    return layer.name, layer.shape, layer.rank, layer.params_after, round(layer.error, 12)


def test_sequential_calibrates_each_block_on_the_compressed_blocks_outputs(tmp_path, monkeypatch):
    model = tiny_llama().double()
    calib = token_ids(4, 12, seed=4)
    seen = {}
    real = factorize

    def spy(W, config, stats, name, cache=None):
        if name == "model.layers.1.self_attn.q_proj":
            seen.setdefault("grams", []).append(stats.inputs[name].gram.clone())
        return real(W, config, stats, name, cache)

    monkeypatch.setattr(rankwise.compress, "factorize", spy)
    report = compress_(
        model, CompressConfig(keep=0.5, min_rank=2, fisher_seqs=2, sequential=True), calib, progress=False
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, rankwise.LowRankLinear)
    dense_gram, sequential_gram = seen["grams"]  # pass C (dense activations), then pass D
    # pass D's statistics are those of block 1's inputs in the compressed model (equal up to the float32
    # per-batch products of InputStats.add: the whole-model forward runs with a KV cache, the blocks without)
    layer = model.model.layers[1].self_attn.q_proj
    after = collect_stats(model, {"q1": layer}, calib, progress=False).inputs["q1"].gram
    torch.testing.assert_close(sequential_gram, after, rtol=1e-6, atol=1e-6 * float(after.abs().max()))
    assert float((sequential_gram - dense_gram).norm() / dense_gram.norm()) > 1e-3
    assert report.timings["sequential"] > 0 and "write" not in report.timings
