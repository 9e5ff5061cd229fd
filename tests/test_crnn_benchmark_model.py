"""The CRNN of benchmarks/crnn.py loads english_g2.pth strictly and reads rendered words (the benchmark's anchor)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("easyocr_en_models")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch
from crnn import (
    CHARACTERS,
    edit_distance,
    evaluate,
    greedy_decode,
    load_crnn,
    make_batches,
)


def test_characters_and_helpers():
    assert len(CHARACTERS) == 96 and len(set(CHARACTERS)) == 96
    logits = torch.full((1, 6, 97), -1.0)
    for t, k in enumerate([0, 1 + CHARACTERS.index("a"), 1 + CHARACTERS.index("a"), 0, 1 + CHARACTERS.index("a"), 0]):
        logits[0, t, k] = 1.0
    assert greedy_decode(logits) == ["aa"]  # repeats merge, a blank separates
    assert edit_distance("kitten", "sitting") == 3


def test_dense_crnn_reads_rendered_words():
    model = load_crnn()  # load_state_dict is strict: every key and shape of the checkpoint matches
    words = ["return", "module", "Python", "object", "value", "class", "lambda", "string"]
    acc, cer = evaluate(model, make_batches(words, batch_size=8))
    assert acc >= 7 / 8 and cer <= 0.05
