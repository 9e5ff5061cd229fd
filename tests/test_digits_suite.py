"""The digits multi-task suite: fixed splits, the task transforms, seeded training, the cache, scoring."""

import copy

import pytest
import torch
from sklearn.datasets import load_digits

from rankwise.suites.digits import DEFAULT_TASKS, TASKS, load_digits_suite, make_model, split_data, train_classifier

SMALL = dict(arch="mlp", tasks=("rot90", "parity"), width=32, base_epochs=8, ft_epochs=8)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits")
    return cache, load_digits_suite(**SMALL, cache_dir=cache)


def test_splits_are_fixed_disjoint_and_cover_the_dataset():
    digits = load_digits()
    index = {(img.tobytes(), int(t)): i for i, (img, t) in enumerate(zip((digits.images / 16).astype("float32"), digits.target))}
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
    train_classifier(torch.nn.Sequential(copy.deepcopy(suite.base).requires_grad_(False), probe), x, y, epochs=8, lr=1e-3, seed=2000)
    assert all(torch.equal(v, suite.heads[0].state_dict()[k]) for k, v in probe.state_dict().items())
    assert suite.heads[1].out_features == 2
    # through the frozen probes, the base beats chance and each fine-tuned backbone beats the base
    for task, ft, chance in zip(suite.tasks, suite.finetuned, (0.1, 0.5)):
        assert suite.accuracy(suite.base, task) >= chance + 0.15
        assert suite.accuracy(ft, task) >= suite.accuracy(suite.base, task) + 0.1
        assert suite.accuracy(ft, task) >= 0.85
    assert not all(torch.equal(v, suite.finetuned[0].state_dict()[k]) for k, v in suite.base.state_dict().items())


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
    with pytest.raises(ValueError, match=r"^heads must be one of finetuned, probe, got 'frozen'$"):
        load_digits_suite(heads="frozen", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^width must be an int >= 1, got 0$"):
        make_model("mlp", width=0)
    assert list(tmp_path.iterdir()) == []  # nothing written on bad input
