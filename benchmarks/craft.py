"""EasyOCR's CRAFT text detector (craft_mlt_25k.pth) defined from the CRAFT paper, with rendered-page evaluation data.

Architecture (Baek et al. 2019, Fig. 2): a VGG16-BN backbone cut into five stages (as the checkpoint's module
names fix them: ``basenet.slice1.10`` is VGG16-BN's ``features[10]``; the stages end after the BN of conv2_2,
conv3_2, conv4_2 and conv5_2, at 1/2, 1/4, 1/8, 1/16 resolution; conv5_3 is not used;
then a 3x3 max-pool of stride 1, a dilated 3x3 "fc6" and a 1x1 "fc7" at 1/16); a U-Net decoder of four
up-convolution blocks (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU), the first reading fc7 and the last stage, each
later one the previous block's output upsampled bilinearly to, and concatenated with, the next shallower stage;
a head of five convolutions giving the region and affinity scores at 1/2 resolution. As with the original's
in-place ReLUs, the stage outputs at 1/2, 1/4 and 1/8 reach the decoder rectified; those at 1/16 (conv5_2 and
fc7) do not.

Test pages: lines of words from CPython's ``pydoc_data.topics`` (as in :mod:`crnn`) drawn in black with Pillow
in the DejaVu fonts on white pages, each word's box known; normalized with the ImageNet mean and std as EasyOCR
does. Boxes from the score maps follow the paper's post-processing: connected components of (region > low_text)
| (affinity > link), kept when they have 10 pixels or more and their peak region score exceeds ``text``, one
axis-aligned box each (the component's bounds; EasyOCR grows its polygons by a dilation margin, which makes them
larger than the words' ink), scaled x2 to the page.

References
----------
Y. Baek, B. Lee, D. Han, S. Yun, H. Lee, "Character region awareness for text detection" (CRAFT), CVPR 2019,
arXiv:1904.01941.
K. Simonyan, A. Zisserman, "Very deep convolutional networks for large-scale image recognition" (VGG),
arXiv:1409.1556; S. Ioffe, C. Szegedy, "Batch normalization", arXiv:1502.03167.
"""

from __future__ import annotations

import random
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/crnn.py: the fonts, the word lists, the weights folder
from crnn import FONT_DIR, FONTS, weights_path

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, EasyOCR's normalizeMeanVariance
STD = (0.229, 0.224, 0.225)
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in page pixels, x1 / y1 exclusive


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]


def _indexed(start: int, *layers: nn.Module) -> nn.Sequential:
    """A Sequential whose children are named by their index in VGG16-BN's ``features``, from ``start``."""
    return nn.Sequential(OrderedDict((str(start + i), m) for i, m in enumerate(layers)))


class VGG16BN(nn.Module):
    """VGG16-BN's convolutions as five slices; ``forward`` returns the five stage outputs, deepest first."""

    def __init__(self):
        super().__init__()
        relu, pool = nn.ReLU, lambda: nn.MaxPool2d(2, 2)
        # features[0:12]: conv1_1, conv1_2, pool, conv2_1, conv2_2 (its BN last); features[12:19], [19:29],
        # [29:39] (to conv3_2, conv4_2, conv5_2): each later slice opens with the ReLU of the previous one's last BN
        self.slice1 = _indexed(0, *_conv_bn(3, 64), relu(), *_conv_bn(64, 64), relu(), pool(), *_conv_bn(64, 128),
                               relu(), *_conv_bn(128, 128))  # fmt: skip
        self.slice2 = _indexed(12, relu(), pool(), *_conv_bn(128, 256), relu(), *_conv_bn(256, 256))
        self.slice3 = _indexed(19, relu(), *_conv_bn(256, 256), relu(), pool(), *_conv_bn(256, 512), relu(),
                               *_conv_bn(512, 512))  # fmt: skip
        self.slice4 = _indexed(29, relu(), *_conv_bn(512, 512), relu(), pool(), *_conv_bn(512, 512), relu(),
                               *_conv_bn(512, 512))  # fmt: skip
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6), nn.Conv2d(1024, 1024, 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s1 = self.slice1(x)
        s2 = self.slice2(s1)
        s3 = self.slice3(s2)
        s4 = self.slice4(s3)
        s5 = self.slice5(s4)
        return [s5, s4, F.relu(s3), F.relu(s2), F.relu(s1)]


class UpConv(nn.Module):
    """1x1 conv (``cin`` -> ``mid``), BN, ReLU, 3x3 conv (-> ``cout``), BN, ReLU."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(), *_conv_bn(mid, cout), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CRAFT(nn.Module):
    """(B, 3, H, W) normalized RGB pages, H and W multiples of 32 -> (B, 2, H/2, W/2) region and affinity scores."""

    def __init__(self):
        super().__init__()
        self.basenet = VGG16BN()
        self.upconv1 = UpConv(1024 + 512, 512, 256)
        self.upconv2 = UpConv(512 + 256, 256, 128)
        self.upconv3 = UpConv(256 + 128, 128, 64)
        self.upconv4 = UpConv(128 + 64, 64, 32)
        relu = nn.ReLU
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), relu(), nn.Conv2d(32, 32, 3, padding=1), relu(),
            nn.Conv2d(32, 16, 3, padding=1), relu(), nn.Conv2d(16, 16, 1), relu(), nn.Conv2d(16, 2, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc7, conv5, *skips = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, conv5], dim=1))  # both at 1/16
        for up, skip in zip((self.upconv2, self.upconv3, self.upconv4), skips):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return self.conv_cls(y)


def load_craft() -> CRAFT:
    state = torch.load(weights_path().with_name("craft_mlt_25k.pth"), map_location="cpu", weights_only=True)
    model = CRAFT()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})  # strict
    return model.eval()


def render_pages(
    words: list[str], n_pages: int, size: int = 768, seed: int = 0
) -> list[tuple[torch.Tensor, list[Box]]]:
    """``n_pages`` white ``size`` x ``size`` pages filled line by line with ``words`` in order (each page one DejaVu
    font and size, 22-36 px), as (page (3, size, size) normalized, the words' ink boxes)."""
    from PIL import Image, ImageDraw, ImageFont

    rng, pages, k = random.Random(seed), [], 0
    for p in range(n_pages):
        px = rng.choice((22, 26, 30, 36))
        font = ImageFont.truetype(str(FONT_DIR / FONTS[(seed + p) % len(FONTS)]), px)
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        margin, boxes = size // 16, []
        x, y = margin, margin
        while True:
            if k == len(words):
                raise ValueError(f"{len(words)} words do not fill {n_pages} pages of {size} px")
            box = draw.textbbox((x, y), words[k], font=font)
            if box[2] > size - margin:  # next line; the gap between words (one em) keeps them unlinked
                x, y = margin, y + int(1.9 * px)
                box = draw.textbbox((x, y), words[k], font=font)
            if box[3] > size - margin:
                break
            draw.text((x, y), words[k], font=font, fill="black")
            boxes.append(tuple(int(v) for v in box))
            x, k = box[2] + px, k + 1
        rgb = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
        mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
        page = (rgb.permute(2, 0, 1).float() / 255 - mean) / std
        pages.append((page, boxes))
    return pages


def detect_boxes(scores: torch.Tensor, text: float = 0.7, link: float = 0.4, low_text: float = 0.4) -> list[Box]:
    """Word boxes in page pixels from one page's (2, H/2, W/2) region / affinity scores (EasyOCR's thresholds)."""
    from scipy import ndimage

    region, affinity = scores[0].numpy(), scores[1].numpy()
    labels, n = ndimage.label((region > low_text) | (affinity > link))
    boxes = []
    for k, where in enumerate(ndimage.find_objects(labels), 1):
        inside = labels[where] == k
        if int(inside.sum()) < 10 or float(region[where][inside].max()) < text:
            continue
        boxes.append((2 * where[1].start, 2 * where[0].start, 2 * where[1].stop, 2 * where[0].stop))
    return sorted(boxes, key=lambda b: (b[1], b[0])) if n else []


def iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_counts(found: list[Box], truth: list[Box], threshold: float = 0.5) -> tuple[int, int, int]:
    """(matched, len(found), len(truth)): pairs taken greedily by decreasing IoU, each box at most once."""
    pairs = sorted(((iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t = set(), set()
    for v, i, j in pairs:
        if v < threshold:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return len(used_f), len(found), len(truth)


def f1(counts: list[tuple[int, int, int]]) -> float:
    """F1 over pages from their :func:`match_counts`."""
    matched, found, truth = (sum(c[i] for c in counts) for i in range(3))
    return 2 * matched / (found + truth) if found + truth else 1.0


def page_boxes(model: nn.Module, pages: list[tuple[torch.Tensor, list[Box]]]) -> list[list[Box]]:
    with torch.no_grad():
        return [detect_boxes(model(page[None])[0]) for page, _ in pages]


if __name__ == "__main__":
    import time

    from crnn import word_lists

    torch.set_num_threads(1)
    model = load_craft()
    _, words = word_lists(0, 1500)
    pages = render_pages(words, 2)
    t = time.perf_counter()
    found = page_boxes(model, pages)
    print(f"dense CRAFT on {len(pages)} pages: {time.perf_counter() - t:.1f}s")
    counts = [match_counts(f, b) for f, (_, b) in zip(found, pages)]
    print(f"vs rendered word boxes: (matched, found, words) {counts}, F1 {f1(counts):.3f}")
