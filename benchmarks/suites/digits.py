"""A multi-task suite on scikit-learn's bundled digits: one base model fine-tuned on eight distinct tasks.

The base model (a backbone plus a linear head) is trained on the plain digits (with
``pretrain="augmented"``, under generic random jitter and label smoothing: a broader "pretraining"
that is none of the tasks; with ``feature_norm=True`` the backbone ends in a parameter-free layer
norm, so heads see normalised features as CLIP's do). Each task then fine-tunes the whole backbone
together with its own linear head (started from the base head, or fresh for another label set); with
``heads="probe"`` or ``"zeroshot"`` each task's head is instead a linear probe on the frozen base features or the base's
own head, kept frozen while the backbone is fine-tuned (the fixed-head protocol of task arithmetic
and AdaMerging on CLIP). Merges combine the backbones only; every task is scored with the merged
backbone followed by its own head, as task arithmetic, TIES and TSV-M do (they keep task-specific
classification heads and merge the shared encoder). The default tasks (:data:`DEFAULT_TASKS`) change
the input domain in seven ways (rotation by 90 degrees, mirror, intensity inversion, a one-pixel
shift, blur plus noise, dilated strokes, an erased centre) and the label set once (parity), so the task
vectors pull the shared backbone in different directions. :data:`HARD_TASKS` swaps three of them for
transforms that destroy the spatial layout (a fixed pixel permutation, a cyclic roll, a checkerboard
sign flip).

Everything is seeded and runs on one CPU thread (seconds at width 256, about a minute at 1024); the
trained weights are cached as one safetensors file under ``~/.cache/rankwise/digits``, keyed by the
training configuration.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLIT_SEED = 0  # fixes the train/val/test split, whatever the training seed
TASK_SEED = 1234  # fixes the random parts of the task definitions (pixel permutation, noise)
N_TEST, N_VAL = 450, 270  # of 1797 images; the remaining 1077 are for training
ARCHS = ("cnn", "mlp")
SPLITS = ("train", "val", "test")
HEAD_MODES = ("finetuned", "probe", "zeroshot")  # see load_digits_suite(heads=...)
PRETRAIN_MODES = ("plain", "augmented")  # see load_digits_suite(pretrain=...)
_CACHE_VERSION = 3


def _rot90(x, y):
    return torch.rot90(x, 1, (1, 2)), y


def _hflip(x, y):
    return x.flip(2), y


def _invert(x, y):
    return 1.0 - x, y


def _permute(x, y):
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(TASK_SEED))
    return x.reshape(-1, 64)[:, perm].reshape(-1, 8, 8), y


def _roll(x, y):
    return torch.roll(x, shifts=(3, 3), dims=(1, 2)), y


def _blur_noise(x, y):
    blurred = F.avg_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(TASK_SEED))
    return blurred + 0.1 * noise, y


def _shift(x, y):
    out = torch.zeros_like(x)
    out[:, 1:, 1:] = x[:, :-1, :-1]
    return out, y


def _dilate(x, y):
    return F.max_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0], y


def _erase(x, y):
    out = x.clone()
    out[:, 2:5, 2:5] = 0.0
    return out, y


def _checker(x, y):
    sign = 1.0 - 2.0 * ((torch.arange(8)[:, None] + torch.arange(8)) % 2)
    return x * sign, y


def _parity(x, y):
    return x, y % 2


# name -> (number of classes, transform of (images (N, 8, 8) in [0, 1], labels (N,)))
TASKS: dict[str, tuple[int, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]]] = {
    "rot90": (10, _rot90),
    "hflip": (10, _hflip),
    "invert": (10, _invert),
    "permute": (10, _permute),
    "roll": (10, _roll),
    "blur_noise": (10, _blur_noise),
    "checker": (10, _checker),
    "shift": (10, _shift),
    "dilate": (10, _dilate),
    "erase": (10, _erase),
    "parity": (2, _parity),
}


DEFAULT_TASKS = ("rot90", "hflip", "invert", "shift", "blur_noise", "dilate", "erase", "parity")
HARD_TASKS = ("rot90", "hflip", "invert", "permute", "roll", "blur_noise", "checker", "parity")


@functools.cache
def _task_data(task: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Images (N, 1, 8, 8) float32 and labels (N,) int64 of ``task`` ("digits" = untransformed) per split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if task != "digits":
        x, y = TASKS[task][1](x, y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    parts = {"test": order[:N_TEST], "val": order[N_TEST : N_TEST + N_VAL], "train": order[N_TEST + N_VAL :]}
    return {s: (x[i, None].contiguous(), y[i].contiguous()) for s, i in parts.items()}


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def make_backbone(
    arch: str = "cnn", *, seed: int = 0, width: int = 64, feature_norm: bool = False
) -> tuple[nn.Sequential, int]:
    """A fresh, seeded feature extractor for 8x8 digits, and the size of its output features.

    ``"cnn"``: conv 3x3 (1 -> 16), ReLU, conv 3x3 (16 -> 32), ReLU, max-pool 2, flatten, linear
    (512 -> ``width``), ReLU. ``"mlp"``: flatten, linear (64 -> ``width``), ReLU, linear
    (``width`` -> ``width``), ReLU. ``feature_norm=True`` appends a layer norm without parameters, so the
    features reaching a head have zero mean and unit variance whatever the weights, as CLIP's image
    embeddings are normalised before its heads. Input: Tensor, shape (N, 1, 8, 8); output shape
    (N, ``width``).

    References
    ----------
    J. L. Ba, J. R. Kiros, G. E. Hinton, "Layer normalization", arXiv:1607.06450, 2016. A. Radford et
    al., "Learning transferable visual models from natural language supervision", ICML 2021.
    """
    _check_choice("arch", arch, ARCHS)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    torch.manual_seed(seed)
    if arch == "cnn":
        layers = [
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, width),
            nn.ReLU(),
        ]
    else:
        layers = [nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    if feature_norm:
        layers.append(nn.LayerNorm(width, elementwise_affine=False))
    return nn.Sequential(*layers), width


def make_model(arch: str = "cnn", num_classes: int = 10, *, seed: int = 0, width: int = 64) -> nn.Sequential:
    """One flat ``nn.Sequential``: :func:`make_backbone` followed by a linear head to ``num_classes`` logits."""
    backbone, features = make_backbone(arch, seed=seed, width=width)
    return nn.Sequential(*backbone, nn.Linear(features, num_classes))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Generic random jitter of 8x8 images, none of the tasks' transforms: a small random affine map
    (rotation within +-10 degrees, scale within +-10 %, translation within +-1/2 pixel, bilinear) then
    Gaussian noise of standard deviation 0.05, every draw from ``generator``.

    x : Tensor, shape (N, 1, 8, 8). Returns a new Tensor of the same shape.

    References
    ----------
    P. Y. Simard, D. Steinkraus, J. C. Platt, "Best practices for convolutional neural networks applied
    to visual document analysis", ICDAR 2003 (small affine distortions of digits as augmentation).
    """
    n = len(x)
    angle = (2 * torch.rand(n, generator=generator) - 1) * math.radians(10)
    zoom = 1 + (2 * torch.rand(n, generator=generator) - 1) * 0.1
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * 0.125  # 1 pixel = 2/8 in grid units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.05 * torch.randn(out.shape, generator=generator)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 64,
    seed: int = 0,
    label_smoothing: float = 0.0,
    augmented: bool = False,
) -> nn.Module:
    """Train ``model`` in place on cross-entropy; minibatch order (and augmentation) drawn from ``seed``.

    x : Tensor, shape (N, 1, 8, 8); y : Tensor of int64, shape (N,).
    optimizer : ``"adam"`` or ``"sgd"`` (momentum 0.9).
    label_smoothing : passed to the cross-entropy, in [0, 1) (C. Szegedy et al., "Rethinking the
        Inception architecture for computer vision", CVPR 2016).
    augmented : each minibatch goes through :func:`augment` first.
    """
    _check_choice("optimizer", optimizer, ("adam", "sgd"))
    g = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            xb = augment(x[idx], g) if augmented else x[idx]
            F.cross_entropy(model(xb), y[idx], label_smoothing=label_smoothing).backward()
            opt.step()
    model.eval()
    return model


def split_data(task: str, split: str) -> tuple[Tensor, Tensor]:
    """Images, shape (N, 1, 8, 8), and labels, shape (N,), of ``task`` (or ``"digits"``) on ``split``."""
    _check_choice("task", task, ("digits", *TASKS))
    _check_choice("split", split, SPLITS)
    return _task_data(task)[split]


@dataclass
class DigitsSuite:
    """A base backbone, one fine-tuned backbone and head per task, and the data to score them.

    ``finetuned[k]`` and ``heads[k]`` belong to ``tasks[k]``. ``head_mode`` says how the heads were
    made (see :func:`load_digits_suite`): ``"finetuned"``, each head started from the base's head (a
    seeded fresh one for tasks with another label set) and was fine-tuned with its backbone; ``"probe"``,
    each head is a linear probe on the base backbone, frozen while its backbone was fine-tuned;
    ``"zeroshot"``, each head is :func:`zeroshot_head` of the base's head, frozen likewise.
    """

    arch: str
    tasks: tuple[str, ...]
    base: nn.Sequential
    finetuned: list[nn.Sequential]
    heads: list[nn.Linear]
    head_mode: str = "finetuned"

    def inputs(self, task: str, split: str = "test") -> Tensor:
        """Unlabeled images of ``task`` on ``split``, shape (N, 1, 8, 8)."""
        return split_data(task, split)[0]

    @torch.no_grad()
    def accuracy(self, backbone: nn.Module, task: str, split: str = "test") -> float:
        """Accuracy of ``backbone`` followed by ``task``'s own fine-tuned head, on ``split``."""
        _check_choice("task", task, self.tasks)
        x, y = split_data(task, split)
        head = self.heads[self.tasks.index(task)]
        return (head(backbone(x)).argmax(1) == y).float().mean().item()

    def evaluate(self, backbone: nn.Module | dict[str, Tensor], split: str = "test") -> dict[str, float]:
        """Per-task accuracy of one backbone (module or state dict of the base's architecture) on ``split``."""
        if isinstance(backbone, dict):
            backbone = self.load_backbone(backbone)
        return {t: self.accuracy(backbone, t, split) for t in self.tasks}

    def load_backbone(self, state: dict[str, Tensor]) -> nn.Sequential:
        """A copy of the base backbone carrying the tensors of ``state`` (e.g. a merge's output)."""
        model = copy.deepcopy(self.base)
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        return model.eval()


def zeroshot_head(head: nn.Linear, num_classes: int) -> nn.Linear:
    """A task head made from the base's digit head alone, as CLIP's zero-shot heads are made from class names.

    ``num_classes`` 10: a copy of ``head``; 2 (parity): class c's logit is the mean of the digit logits of
    the digits of parity c (rows and biases averaged). head : nn.Linear, shape (10, features).

    References
    ----------
    A. Radford et al., "Learning transferable visual models from natural language supervision", ICML
    2021 (zero-shot heads); G. Ilharco et al., "Editing models with task arithmetic", ICLR 2023 (heads
    kept frozen while the encoder is fine-tuned).
    """
    if num_classes == head.out_features:
        return copy.deepcopy(head)
    if num_classes != 2:
        raise ValueError(f"num_classes must be {head.out_features} or 2 for a zero-shot head, got {num_classes!r}")
    out = nn.Linear(head.in_features, 2)
    with torch.no_grad():
        for c in (0, 1):
            out.weight[c] = head.weight[c::2].mean(0)
            out.bias[c] = head.bias[c::2].mean()
    return out


def _train_suite(arch: str, tasks: tuple[str, ...], seed: int, cfg: dict, heads: str) -> dict[str, Tensor]:
    backbone, features = make_backbone(arch, seed=seed, width=cfg["width"], feature_norm=cfg.get("feature_norm", False))
    head = nn.Linear(features, 10)
    x, y = split_data("digits", "train")
    train_classifier(
        nn.Sequential(backbone, head),
        x,
        y,
        epochs=cfg["base_epochs"],
        lr=cfg["lr"],
        seed=seed,
        augmented=cfg.get("pretrain") == "augmented",
        label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    state = {f"base.{k}": v for k, v in backbone.state_dict().items()}
    backbone.requires_grad_(False)
    for i, task in enumerate(tasks):
        x, y = split_data(task, "train")
        if heads == "probe":  # a linear probe on the frozen base features, then kept frozen
            torch.manual_seed(seed + 1000 + i)
            ft_head = nn.Linear(features, TASKS[task][0])
            train_classifier(
                nn.Sequential(backbone, ft_head), x, y, epochs=cfg["base_epochs"], lr=cfg["lr"], seed=seed + 2000 + i
            )
            ft_head.requires_grad_(False)
        elif heads == "zeroshot":  # the base's own head, frozen; no task data used to make it
            ft_head = zeroshot_head(head, TASKS[task][0]).requires_grad_(False)
        elif TASKS[task][0] == head.out_features:
            ft_head = copy.deepcopy(head)
        else:  # another label set: a fresh seeded head
            torch.manual_seed(seed + 1000 + i)
            ft_head = nn.Linear(features, TASKS[task][0])
        ft = copy.deepcopy(backbone).requires_grad_(True)
        train_classifier(
            nn.Sequential(ft, ft_head),
            x,
            y,
            epochs=cfg["ft_epochs"],
            lr=cfg["ft_lr"],
            optimizer="sgd",
            seed=seed + 1 + i,
        )
        ft_head.requires_grad_(True)
        state.update({f"{task}.backbone.{k}": v for k, v in ft.state_dict().items()})
        state.update({f"{task}.head.{k}": v for k, v in ft_head.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_digits_suite(
    arch: str = "mlp",
    tasks: Sequence[str] | None = None,
    *,
    seed: int = 0,
    width: int = 256,
    base_epochs: int = 30,
    ft_epochs: int = 15,
    lr: float = 1e-3,
    ft_lr: float = 0.03,
    heads: str = "finetuned",
    pretrain: str = "plain",
    label_smoothing: float = 0.0,
    feature_norm: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> DigitsSuite:
    """Train (or read from the cache) the base model and one fine-tune per task.

    Parameters
    ----------
    arch : ``"cnn"`` or ``"mlp"``, see :func:`make_backbone`.
    tasks : names from :data:`TASKS` (default :data:`DEFAULT_TASKS`), in the order merges receive them.
    seed : seeds the initialisation and every minibatch order.
    width : the backbone's feature size, see :func:`make_backbone`.
    base_epochs, lr : Adam training of the base on the plain digits.
    pretrain : ``"plain"`` trains the base on the digits as they are; ``"augmented"`` on the digits under
        :func:`augment`'s generic random jitter (none of the tasks' transforms), a broader "pretraining"
        whose features degrade more gracefully off its training distribution.
    label_smoothing : of the base's training loss, in [0, 1): a less overconfident base head.
    feature_norm : the backbone ends with a parameter-free layer norm (see :func:`make_backbone`), so a
        merge cannot make a frozen head more confident by scaling the features up: what AdaMerging's
        entropy objective needs to track accuracy (see BENCHMARKS.md).
    ft_epochs, ft_lr : SGD (momentum 0.9) fine-tuning of backbone and head on each task. SGD keeps each
        task vector in the span of its task's gradients; Adam fine-tunes (tried) move every weight
        alike and merge worse with every method, see BENCHMARKS.md.
    heads : how each task's linear head is made. ``"finetuned"``: started from the base's head (a
        seeded fresh one for another label set) and fine-tuned together with the backbone.
        ``"probe"``: trained first as a linear probe on the frozen base backbone's features (Adam,
        ``base_epochs`` epochs, ``lr``), then kept frozen while the backbone is fine-tuned, so that
        only the backbone moves; this mirrors AdaMerging's and task arithmetic's protocol on CLIP,
        whose classification heads are fixed (zero-shot) and never fine-tuned, and makes the base
        backbone with each head a calibrated classifier instead of a confidently wrong one.
        ``"zeroshot"``: :func:`zeroshot_head` of the base's head, kept frozen while the backbone is
        fine-tuned: fixed heads made without task data, as CLIP's zero-shot heads are (weaker than a
        probe, so the backbone has to move to the head).
    cache_dir : where trained weights are kept (default ``~/.cache/rankwise/digits``); the file name
        hashes the whole configuration, so changing any argument trains afresh.

    Returns
    -------
    DigitsSuite, all modules in eval mode, float32, on the CPU.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("heads", heads, HEAD_MODES)
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    for t in tasks:
        _check_choice("task", t, tuple(TASKS))
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from {', '.join(TASKS)}, got {list(tasks)!r}")
    _check_choice("pretrain", pretrain, PRETRAIN_MODES)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0 <= label_smoothing < 1
    ):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    cfg = {
        "version": _CACHE_VERSION,
        "arch": arch,
        "tasks": list(tasks),
        "seed": seed,
        "width": width,
        "base_epochs": base_epochs,
        "ft_epochs": ft_epochs,
        "lr": lr,
        "ft_lr": ft_lr,
    }
    # options at their defaults stay out of the key, so suites trained before an option existed keep their file
    for name, value, default in (
        ("heads", heads, "finetuned"),
        ("pretrain", pretrain, "plain"),
        ("label_smoothing", float(label_smoothing), 0.0),
        ("feature_norm", bool(feature_norm), False),
    ):
        if value != default:
            cfg[name] = value
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "rankwise" / "digits"
    path = root / f"{arch}-{key}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.exists():
        state = load_file(path)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the suite must stay cheap on a shared CPU
        try:
            state = _train_suite(arch, tasks, seed, cfg, heads)
        finally:
            torch.set_num_threads(threads)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(state, tmp, metadata={"config": json.dumps(cfg, sort_keys=True)})
        os.replace(tmp, path)

    def backbone(prefix: str) -> nn.Sequential:
        model = make_backbone(arch, seed=seed, width=width, feature_norm=feature_norm)[0]
        model.load_state_dict(_strip(state, prefix))
        return model.eval()

    head_modules = []
    for t in tasks:
        h = _strip(state, f"{t}.head.")
        head = nn.Linear(h["weight"].shape[1], h["weight"].shape[0])
        head.load_state_dict(h)
        head_modules.append(head.eval())
    return DigitsSuite(arch, tasks, backbone("base."), [backbone(f"{t}.backbone.") for t in tasks], head_modules, heads)
