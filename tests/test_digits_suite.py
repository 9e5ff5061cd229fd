"""The digits multi-task suite: fixed splits, the task transforms, seeded training, the cache, scoring."""

import copy

import pytest
import torch
from sklearn.datasets import load_digits

from suites.digits import (
    DEFAULT_TASKS,
    TASKS,
    augment,
    load_digits_suite,
    make_backbone,
    make_model,
    split_data,
    train_classifier,
    zeroshot_head,
)

SMALL = {"arch": "mlp", "tasks": ("rot90", "parity"), "width": 32, "base_epochs": 8, "ft_epochs": 8}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits")
    return cache, load_digits_suite(**SMALL, cache_dir=cache)


def test_splits_are_fixed_disjoint_and_cover_the_dataset():
    digits = load_digits()
    images = (digits.images / 16).astype("float32")
    index = {(img.tobytes(), int(t)): i for i, (img, t) in enumerate(zip(images, digits.target))}
    assert len(index) == 1797
    seen = []
    for split, n in (("train", 1077), ("val", 270), ("test", 450)):
        x, y = split_data("digits", split)
        assert x.shape == (n, 1, 8, 8) and y.shape == (n,) and y.dtype == torch.int64
        seen += [index[(img.numpy().tobytes(), int(t))] for img, t in zip(x[:, 0], y)]
    assert len(seen) == len(set(seen)) == 1797  # every image lands in exactly one split


def test_task_transforms():
    x, y = split_data("digits", "test")
    xr, yr = split_data("rot90", "test")
    assert torch.equal(xr, torch.rot90(x, 1, (2, 3))) and torch.equal(yr, y)
    assert torch.equal(split_data("invert", "test")[0], 1 - x)
    assert torch.equal(split_data("hflip", "test")[0], x.flip(3))
    assert torch.equal(split_data("parity", "test")[1], y % 2)
    xp = split_data("permute", "test")[0]
    assert torch.equal(xp.flatten(1).sort(1).values, x.flatten(1).sort(1).values) and not torch.equal(xp, x)
    assert len(DEFAULT_TASKS) >= 6 and set(DEFAULT_TASKS) <= set(TASKS)


def test_fine_tunes_learn_their_task_and_the_suite_is_cached(small):
    cache, suite = small
    assert suite.tasks == ("rot90", "parity")
    for task, ft in zip(suite.tasks, suite.finetuned):
        assert suite.accuracy(ft, task) >= 0.85
    assert suite.accuracy(suite.finetuned[0], "rot90") > suite.accuracy(suite.base, "rot90") + 0.5
    assert suite.heads[1].out_features == 2
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    stamp = files[0].stat().st_mtime_ns
    again = load_digits_suite(**SMALL, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp  # read back, not retrained
    for a, b in zip([suite.base, *suite.finetuned], [again.base, *again.finetuned]):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_training_is_seeded(small, tmp_path):
    _, suite = small
    fresh = load_digits_suite(**SMALL, cache_dir=tmp_path)  # retrained from scratch, same seed
    for a, b in zip([suite.base, *suite.finetuned], [fresh.base, *fresh.finetuned]):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_evaluate_takes_modules_or_state_dicts(small):
    _, suite = small
    by_module = suite.evaluate(suite.finetuned[0])
    by_state = suite.evaluate(suite.finetuned[0].state_dict())
    assert by_module == by_state and set(by_module) == {"rot90", "parity"}
    x, y = split_data("rot90", "val")
    want = (suite.heads[0](suite.finetuned[0](x)).argmax(1) == y).float().mean().item()
    assert suite.accuracy(suite.finetuned[0], "rot90", "val") == want


def test_probe_heads_are_linear_probes_kept_frozen(small, tmp_path):
    _, finetuned = small
    suite = load_digits_suite(**SMALL, heads="probe", cache_dir=tmp_path)
    assert suite.head_mode == "probe" and finetuned.head_mode == "finetuned"
    assert len(list(tmp_path.iterdir())) == 1  # its own cache file, not the default suite's
    assert all(torch.equal(v, finetuned.base.state_dict()[k]) for k, v in suite.base.state_dict().items())
    # retrain the probe of task 0 exactly as the suite does: the stored head is that probe, untouched by fine-tuning
    torch.manual_seed(1000)
    probe = torch.nn.Linear(32, 10)
    x, y = split_data("rot90", "train")
    frozen = copy.deepcopy(suite.base).requires_grad_(False)
    train_classifier(torch.nn.Sequential(frozen, probe), x, y, epochs=8, lr=1e-3, seed=2000)
    assert all(torch.equal(v, suite.heads[0].state_dict()[k]) for k, v in probe.state_dict().items())
    assert suite.heads[1].out_features == 2
    # through the frozen probes, the base beats chance and each fine-tuned backbone beats the base
    for task, ft, chance in zip(suite.tasks, suite.finetuned, (0.1, 0.5)):
        assert suite.accuracy(suite.base, task) >= chance + 0.15
        assert suite.accuracy(ft, task) >= suite.accuracy(suite.base, task) + 0.1
        assert suite.accuracy(ft, task) >= 0.85
    assert not all(torch.equal(v, suite.finetuned[0].state_dict()[k]) for k, v in suite.base.state_dict().items())


def test_augment_is_a_seeded_small_jitter():
    x = split_data("digits", "val")[0]
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    # on blank images only the noise is left: standard deviation 0.05
    noise = augment(torch.zeros(2000, 1, 8, 8), torch.Generator().manual_seed(0))
    assert abs(noise.std().item() - 0.05) < 0.001 and abs(noise.mean().item()) < 0.001

    # a small jitter: each image stays far closer to itself than to any task's transform of it
    def dist(u, v):
        return (u - v).flatten(1).norm(dim=1).mean().item()

    for task in ("rot90", "hflip", "invert", "shift", "permute", "roll", "checker"):
        assert dist(a, x) < 0.6 * dist(a, split_data(task, "val")[0]), task
    assert x.equal(split_data("digits", "val")[0])  # input untouched


def test_augmented_pretraining_with_label_smoothing(small, tmp_path):
    _, plain = small
    suite = load_digits_suite(**SMALL, pretrain="augmented", label_smoothing=0.1, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # its own cache file
    assert not torch.equal(suite.base.state_dict()["1.weight"], plain.base.state_dict()["1.weight"])
    # the same architecture, seeded, still a digit classifier
    assert (
        load_digits_suite(**SMALL, pretrain="augmented", label_smoothing=0.1, cache_dir=tmp_path)
        .base.state_dict()["1.weight"]
        .equal(suite.base.state_dict()["1.weight"])
    )
    for task, ft in zip(suite.tasks, suite.finetuned):
        assert suite.accuracy(ft, task) >= 0.85
    # retrain the base exactly as the suite does
    torch.manual_seed(0)
    model = make_model("mlp", num_classes=10, seed=0, width=32)
    x, y = split_data("digits", "train")
    train_classifier(model, x, y, epochs=8, lr=1e-3, seed=0, augmented=True, label_smoothing=0.1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in suite.base.state_dict().items())
    # label smoothing: the base is less confident on inputs it was not trained on (rot90)
    ref = train_classifier(make_model("mlp", num_classes=10, seed=0, width=32), x, y, epochs=8, lr=1e-3, seed=0)
    xr = split_data("rot90", "val")[0]
    with torch.no_grad():
        conf = [torch.softmax(m(xr), 1).max(1).values.mean().item() for m in (model, ref)]
    assert conf[0] < conf[1] - 0.05, conf


def test_zeroshot_heads_are_the_base_head_kept_frozen(tmp_path):
    suite = load_digits_suite(**SMALL, heads="zeroshot", cache_dir=tmp_path)
    torch.manual_seed(0)
    model = make_model("mlp", num_classes=10, seed=0, width=32)
    train_classifier(model, *split_data("digits", "train"), epochs=8, lr=1e-3, seed=0)
    base_head = model[-1]
    assert all(torch.equal(v, suite.heads[0].state_dict()[k]) for k, v in base_head.state_dict().items())
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        digit_logits = base_head(x)
        want = torch.stack([digit_logits[:, 0::2].mean(1), digit_logits[:, 1::2].mean(1)], 1)
        torch.testing.assert_close(suite.heads[1](x), want, rtol=1e-6, atol=1e-6)
    for task, ft in zip(suite.tasks, suite.finetuned):
        assert suite.accuracy(ft, task) >= suite.accuracy(suite.base, task) + 0.1
    assert suite.accuracy(suite.finetuned[0], "rot90") >= 0.85
    with pytest.raises(ValueError, match=r"^num_classes must be 10 or 2 for a zero-shot head, got 3$"):
        zeroshot_head(base_head, 3)


def test_feature_norm_normalises_and_undoes_weight_scaling(small, tmp_path):
    plain, _ = make_backbone("mlp", seed=0, width=32)
    normed, features = make_backbone("mlp", seed=0, width=32, feature_norm=True)
    assert features == 32 and isinstance(normed[-1], torch.nn.LayerNorm)
    assert plain.state_dict().keys() == normed.state_dict().keys()  # no new parameters, same seeded weights
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in plain.state_dict().items())
    x = split_data("rot90", "val")[0]
    with torch.no_grad():
        f = normed(x)
        torch.testing.assert_close(f.mean(1), torch.zeros(len(x)), rtol=0, atol=1e-6)
        p0 = plain(x)
        v = p0.var(1, unbiased=False)
        torch.testing.assert_close(f.var(1, unbiased=False), v / (v + 1e-5), rtol=1e-4, atol=0)  # unit up to eps
        torch.testing.assert_close(f, torch.nn.functional.layer_norm(p0, (32,)), rtol=0, atol=1e-6)
        # scaling the last layer's weights and bias by 3 triples the plain features but leaves the normalised
        # ones (up to the eps of 1e-5 added to their variance, here ~5e-3)
        for m in (plain, normed):
            m[3].weight.mul_(3.0)
            m[3].bias.mul_(3.0)
        torch.testing.assert_close(plain(x), 3 * p0, rtol=1e-5, atol=1e-6)
        assert (normed(x) - f).abs().max() < 1e-2
    _, plain_suite = small
    suite = load_digits_suite(**SMALL, feature_norm=True, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # its own cache file
    assert isinstance(suite.base[-1], torch.nn.LayerNorm) and isinstance(suite.finetuned[1][-1], torch.nn.LayerNorm)
    assert not isinstance(plain_suite.base[-1], torch.nn.LayerNorm)
    for task, ft in zip(suite.tasks, suite.finetuned):
        assert suite.accuracy(ft, task) >= 0.85


def test_cnn_shapes():
    model = make_model("cnn", num_classes=10, seed=0, width=24)
    assert any(isinstance(m, torch.nn.Conv2d) for m in model)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_bad_input(tmp_path):
    known = ", ".join(TASKS)
    with pytest.raises(ValueError, match=rf"^task must be one of {known}, got 'nope'$"):
        load_digits_suite(tasks=("rot90", "nope"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^arch must be one of cnn, mlp, got 'vit'$"):
        load_digits_suite(arch="vit", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^split must be one of train, val, test, got 'dev'$"):
        split_data("rot90", "dev")
    with pytest.raises(ValueError, match=r"^tasks must be distinct names from .*, got \['rot90', 'rot90'\]$"):
        load_digits_suite(tasks=("rot90", "rot90"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^heads must be one of finetuned, probe, zeroshot, got 'frozen'$"):
        load_digits_suite(heads="frozen", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^pretrain must be one of plain, augmented, got 'imagenet'$"):
        load_digits_suite(pretrain="imagenet", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^label_smoothing must be a number in \[0, 1\), got 1.0$"):
        load_digits_suite(label_smoothing=1.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^width must be an int >= 1, got 0$"):
        make_model("mlp", width=0)
    assert list(tmp_path.iterdir()) == []  # nothing written on bad input
