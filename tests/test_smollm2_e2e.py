"""End to end on the real SmolLM2-135M-Instruct: compress at keep 0.9, save, reload both ways, perplexity near dense."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import perplexity
from rankwise.io.models import load_model

# Quality bound: keep 0.9 of the block linears, calibrated on 8 x 256 tokens, must stay within 1.25x
# the dense perplexity on 4 x 128 held-out tokens. Measured 2026-11-23: dense 26.84, compressed 29.49
# (ratio 1.10). With 4 x 128 calibration tokens it was 79.5 (2.96x): whitening needs more tokens
# than the 576/1536 input features, so the calibration here is not made smaller.
MAX_PPL_RATIO = 1.25


@pytest.mark.slow
def test_smollm2_compress_save_reload(tmp_path):
    model, tokenizer, kind = load_model("smollm2")  # the GGUF conversion is cached under ~/.cache/rankwise
    assert kind == "causal-lm"
    calib = token_sequences(tokenizer, builtin_text("calib"), 256, 8)
    held_out = token_sequences(tokenizer, builtin_text("eval"), 128, 4, what="evaluation")
    dense = perplexity(model, held_out, progress=False)

    report = rankwise.compress_(
        model, rankwise.CompressConfig(keep=0.9, seq_len=256, calib_seqs=8), calib, progress=False
    )
    assert len(report.ranks) > 0
    assert report.params_after <= 0.9 * report.params_before
    compressed = perplexity(model, held_out, progress=False)
    assert math.isfinite(compressed) and compressed <= MAX_PPL_RATIO * dense, (dense, compressed)

    rankwise.save(model, tmp_path / "smol", report=report, tokenizer=tokenizer)
    ids = held_out[:1, :64]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for reloaded in (rankwise.load(tmp_path / "smol"), AutoModelForCausalLM.from_pretrained(tmp_path / "smol")):
            assert {
                n: m.rank for n, m in reloaded.named_modules() if isinstance(m, rankwise.LowRankLinear)
            } == report.ranks
            assert torch.equal(reloaded(input_ids=ids).logits, expected)
