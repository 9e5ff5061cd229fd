"""The CRAFT of benchmarks/craft.py loads craft_mlt_25k.pth strictly and finds rendered words (the benchmark anchor)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("easyocr_en_models")
pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch
from craft import detect_boxes, f1, iou, load_craft, match_counts, page_boxes, render_pages


def test_box_helpers():
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    # greedy by IoU: the best pair is taken first, the other found box then has no partner left
    found = [(0, 0, 10, 10), (1, 0, 11, 10)]
    assert match_counts(found, [(1, 0, 11, 10)]) == (1, 2, 1)
    assert f1([(1, 2, 1), (3, 3, 3)]) == pytest.approx(2 * 4 / 9)
    scores = torch.zeros(2, 20, 30)
    scores[0, 2:6, 3:9] = 0.9  # a word: region peak above 0.7
    scores[0, 2:6, 12:16] = 0.5  # above low_text but never above 0.7: dropped
    scores[0, 10:14, 3:7] = 0.8
    scores[1, 11:13, 7:10] = 0.6  # affinity linking the third region to the fourth
    scores[0, 10:14, 10:15] = 0.8
    scores[0, 17, 20:22] = 0.9  # 2 pixels: below the 10-pixel minimum
    assert detect_boxes(scores) == [(6, 4, 18, 12), (6, 20, 30, 28)]


def test_dense_craft_finds_rendered_words():
    model = load_craft()  # load_state_dict is strict: every key and shape of the checkpoint matches
    words = "return module Python object value class lambda string yield import global while assert format".split()
    pages = render_pages(words, 1, size=256, seed=1)
    (found,) = page_boxes(model, pages)
    truth = pages[0][1]
    assert len(truth) == 8  # DejaVu Serif (seed 1); at this size DejaVu Sans Mono splits words
    matched, n_found, n_words = match_counts(found, truth)
    assert n_found == n_words == matched == 8
    # each word's best box covers its ink closely (measured: 0.745 to 0.872)
    assert min(max(iou(f, w) for f in found) for w in truth) >= 0.7
