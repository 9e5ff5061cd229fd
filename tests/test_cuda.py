"""On a GPU: compression, factorized layers, saving and perplexity give the CPU's numbers (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import rankwise
from rankwise import CompressConfig, compress_
from rankwise.eval import perplexity
from rankwise.layers import LowRankLinear

from _tiny_models import tiny_model, token_ids

pytestmark = pytest.mark.cuda
CALIB = token_ids(8, 16)
PROBE = token_ids(2, 12, seed=1)


def logits(model, device) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE.to(device)).logits.cpu()


def test_low_rank_linear_on_cuda_matches_cpu():
    dense = torch.nn.Linear(48, 40, dtype=torch.float64)
    layer = LowRankLinear.from_dense(dense, 7)
    x = torch.randn(5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on_gpu = LowRankLinear.from_dense(dense.cuda(), 7)
    assert on_gpu.down.weight.is_cuda and on_gpu.rank == layer.rank == 7
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), layer(x), rtol=0, atol=1e-12)


def test_compress_on_cuda_gives_the_cpu_ranks_and_logits(tmp_path):
    # float64 so that CPU and GPU round-off (~1e-15) cannot change a rank or move the logits visibly
    config = CompressConfig(keep=0.6, method="whiten", allocate="loss-aware", min_rank=2)
    cpu = tiny_model("llama", dtype=torch.float64)
    gpu = tiny_model("llama", dtype=torch.float64).cuda()
    cpu_report = compress_(cpu, config, CALIB, progress=False)
    gpu_report = compress_(gpu, config, CALIB, progress=False)
    assert gpu_report.ranks == cpu_report.ranks and any(r is not None for r in gpu_report.ranks.values())
    assert all(p.is_cuda for p in gpu.parameters())
    expected = logits(cpu, "cpu")
    torch.testing.assert_close(logits(gpu, "cuda"), expected, rtol=0, atol=1e-8)
    rankwise.save(gpu, tmp_path / "c")
    reloaded = rankwise.load(tmp_path / "c")  # written from CUDA tensors, read on CPU
    torch.testing.assert_close(logits(reloaded, "cpu"), logits(gpu, "cuda"), rtol=0, atol=1e-10)


def test_perplexity_on_cuda_matches_cpu():
    model = tiny_model("llama", dtype=torch.float64)
    ids = token_ids(3, 20, seed=2)
    on_cpu = perplexity(model, ids, progress=False)
    on_gpu = perplexity(model.cuda(), ids, progress=False)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-9)


def test_quantizing_run_on_cuda_gives_the_cpu_choices(tmp_path):
    """The block-by-block byte budget on the GPU: the CPU's per-layer choices and bytes, close logits, and an output
    written from CUDA tensors that both loaders read identically."""
    from transformers import AutoModelForCausalLM

    from rankwise.quant_checkpoint import compress_quantized

    from _tiny_models import save_model_dir, tiny_llama

    src = save_model_dir(tiny_llama(), tmp_path / "in")
    runs = {
        device: compress_quantized(src, tmp_path / device, CALIB, bits_per_weight=3.0, device=device, progress=False)
        for device in ("cpu", "cuda")
    }
    assert [(r.name, r.config) for r in runs["cuda"].layers] == [(r.name, r.config) for r in runs["cpu"].layers]
    assert runs["cuda"].model_bytes == runs["cpu"].model_bytes
    cpu, gpu = (rankwise.load(tmp_path / device) for device in ("cpu", "cuda"))
    expected = logits(cpu, "cpu")
    assert float((logits(gpu, "cpu") - expected).norm()) < 1e-2 * float(expected.norm())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda")
    assert torch.equal(logits(stock, "cpu"), logits(gpu, "cpu"))
