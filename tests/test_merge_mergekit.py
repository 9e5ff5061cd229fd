"""Cross-check with mergekit: the same YAML config gives the same tensors; the reader rejects what it cannot map."""

from __future__ import annotations

import pytest
import torch
import yaml

from rankwise.io import open_checkpoint
from rankwise.merging import merge
from rankwise.merging.mergekit_yaml import read_mergekit_config

from _tiny_models import tiny_model


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny random Llama base and three perturbed fine-tunes saved as HF safetensors dirs."""
    root = tmp_path_factory.mktemp("llamas")
    base = tiny_model("llama", vocab_size=64, tie_word_embeddings=False)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    # a shared direction plus independent noise, so task vectors are correlated (cos ~ 0.5) as real fine-tunes are
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    for i in range(3):
        sd = {k: v + 0.02 * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.state_dict().items()}
        ft = tiny_model("llama", vocab_size=64, tie_word_embeddings=False)
        ft.load_state_dict(sd)
        ft.save_pretrained(root / f"ft{i}")
    return root


def _write(root, name, cfg):
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_mergekit(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False),
    )
    return open_checkpoint(out)


CASES = {
    # linear averages base_model in with the models (its weight from the global parameters)
    "linear": ({"weight": 0.5}, [2.0, 1.0, 0.25], True),
    "task_arithmetic": ({"lambda": 0.7}, [1.0, 0.5, 0.8], True),
    "ties": ({"density": 0.3}, [1.0, 0.5, 0.8], True),
    "ties_unnormalized": ({"density": 0.5, "normalize": False, "lambda": 0.6}, [1.0, -0.5, 0.8], True),
    "model_stock": ({}, None, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(llamas, tmp_path, case):
    pytest.importorskip("mergekit")
    params, weights, with_base = CASES[case]
    method = case.split("_unnormalized")[0]
    models = [
        {"model": str(llamas / f"ft{i}"), **({"parameters": {"weight": weights[i]}} if weights else {})}
        for i in range(3)
    ]
    if method == "model_stock":
        models.insert(0, {"model": str(llamas / "base")})  # mergekit lists the base among the inputs
    cfg = {
        "merge_method": method,
        "base_model": str(llamas / "base"),
        "dtype": "float32",
        "models": models,
        "parameters": params,
    }
    theirs = _run_mergekit(cfg, tmp_path / "mergekit")
    spec = read_mergekit_config(_write(tmp_path, case, cfg))
    ours = merge(spec.models, spec.method, spec.base, dtype=spec.dtype, **spec.options)
    assert sorted(ours) == theirs.keys()
    base = open_checkpoint(llamas / "base")
    for name in theirs.keys():
        t = theirs.get(name)
        assert ours[name].dtype == t.dtype == torch.float32
        # the merge moved the weights (so equality is not trivially the base) and both agree to float rounding
        assert (t - base.get(name)).abs().max() > 1e-3
        assert torch.allclose(ours[name], t, rtol=0, atol=1e-6), (name, (ours[name] - t).abs().max())


def test_reader_maps_mergekit_defaults_and_notes(llamas, tmp_path):
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(llamas / "base"),
        "tokenizer_source": "base",
        "models": [
            {"model": str(llamas / "base")},
            {"model": str(llamas / "ft0"), "parameters": {"weight": 0.3, "density": 0.4}},
            {"model": str(llamas / "ft1")},
        ],
        "parameters": {"weight": 0.6, "int8_mask": True},
        "out_dtype": "bfloat16",
    }
    spec = read_mergekit_config(_write(tmp_path, "dt", cfg))
    assert spec.method == "dare" and spec.base == llamas / "base"
    assert spec.models == [llamas / "ft0", llamas / "ft1"]  # the listed base is the base, not a task
    assert spec.options == {
        "sign_consensus": True,
        "weights": [0.3, 0.6],
        "density": [0.4, 1.0],
        "normalize": False,
        "scale": 1.0,
        "rescale": "l1",
    }
    assert spec.dtype == torch.bfloat16
    assert spec.notes[0] == "'tokenizer_source' is ignored (the base model's tokenizer files are copied)"


@pytest.mark.parametrize(
    "patch, error, message",
    [
        (
            {"merge_method": "slerp"},
            ValueError,
            r"merge_method 'slerp' in '.*' is not supported; supported: linear, task_arithmetic, ties",
        ),
        (
            {"lora_rank": 8, "zz": 1},
            ValueError,
            r"unknown key\(s\) 'lora_rank', 'zz' in '.*bad.yml'; accepted: base_model, chat_template",
        ),
        (
            {"parameters": {"densty": 0.5}},
            ValueError,
            r"unknown parameter\(s\) 'densty' for merge_method 'ties'; "
            r"accepted: density, int8_mask, lambda, normalize, weight",
        ),
        ({"parameters": {"density": [0.1, 0.9]}}, ValueError, r"parameters.density is a per-layer gradient or filter"),
        ({"slices": []}, ValueError, r"'slices' in '.*' is not supported; rankwise reads the 'models' form only"),
        ({"base_model": "no/such/model"}, FileNotFoundError, r"base_model 'no/such/model' does not exist"),
        ({"dtype": "int4"}, ValueError, r"dtype must be one of float32, float16, bfloat16, float64, got 'int4'"),
    ],
)
def test_reader_rejects_what_it_cannot_map(llamas, tmp_path, patch, error, message):
    cfg = {
        "merge_method": "ties",
        "base_model": str(llamas / "base"),
        "models": [{"model": str(llamas / "ft0"), "parameters": {"weight": 1.0}}],
        **patch,
    }
    with pytest.raises(error, match=message):
        read_mergekit_config(_write(tmp_path, "bad", cfg))


def test_reader_rejects_unknown_model_keys_and_missing_file(llamas, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(llamas / "ft0"), "weight": 1.0}]}
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'weight' in models\[0\]; accepted: model, parameters"):
        read_mergekit_config(_write(tmp_path, "m", cfg))
    with pytest.raises(FileNotFoundError, match=r"merge config '.*nope.yml' does not exist"):
        read_mergekit_config(tmp_path / "nope.yml")
