"""copy_model_files and write_model_card; save / delta apply / merge carry the input's files into their output."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise.delta import Delta, apply_delta_checkpoint
from rankwise.io.models import load_model
from rankwise.io.sidecar import SidecarWarning, copy_model_files, write_model_card
from rankwise.merging import merge_to_dir

from _tiny_models import factorize_some, minilm_dir, save_model_dir, tiny_bert, tiny_llama, tree_digest

ST_FILES = {
    "modules.json": json.dumps(
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
    ),
    "sentence_bert_config.json": '{"max_seq_length": 128, "do_lower_case": false}',
    "config_sentence_transformers.json": '{"__version__": {"sentence_transformers": "5.0.0"}}',
    "1_Pooling/config.json": '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}',
    "chat_template.jinja": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2}',
}


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_copies_every_sidecar_and_no_weight_or_rewritten_file(tmp_path):
    src = write_files(
        tmp_path / "src",
        {
            **ST_FILES,
            "config.json": "{}",
            "README.md": "old card",
            "model.safetensors": b"w",
            "pytorch_model.bin": b"w",
            "model.safetensors.index.json": "{}",
            "pytorch_model.bin.index.json": "{}",
            "rankwise_report.json": "{}",
            "rankwise_source.json": "{}",
            "onnx/model.onnx": b"w",
            ".gitattributes": "x",
            ".cache/huggingface/x": "y",
            "2_Dense/model.safetensors": b"dense projection",
            "2_Dense/config.json": '{"in_features": 32}',
            "tokenizer.json": "{}",
            "vocab.txt": "a\nb\n",
            "data_config.json": "[]",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation_config.json").write_text('{"re-serialized": true}')  # the input's copy is authoritative
    before = tree_digest(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent input warns about nothing (the Normalize folder is optional)
        copied = copy_model_files(src, out)
    expected = sorted(
        [
            *ST_FILES,
            "2_Dense/model.safetensors",
            "2_Dense/config.json",
            "tokenizer.json",
            "vocab.txt",
            "data_config.json",
        ]
    )
    assert copied == expected
    assert read_tree(out) == {rel: (src / rel).read_bytes() for rel in expected}
    assert tree_digest(src) == before


def test_inconsistent_modules_json_is_copied_with_one_warning(tmp_path):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    src = write_files(tmp_path / "src", {"modules.json": json.dumps(modules)})
    (tmp_path / "out").mkdir()
    with pytest.warns(SidecarWarning) as record:
        copied = copy_model_files(src, tmp_path / "out")
    assert [str(w.message) for w in record] == [
        f"'{src / 'modules.json'}' names module folder '1_Pooling', which '{src}' lacks; modules.json copied as it is"
    ]
    assert copied == ["modules.json"]
    assert (tmp_path / "out" / "modules.json").read_text() == json.dumps(modules)


def test_unparsable_json_is_copied_and_a_dangling_link_skipped_with_warnings(tmp_path):
    src = write_files(tmp_path / "src", {"modules.json": "[{", "tokenizer_config.json": "{not json", "vocab.txt": "a"})
    (src / "special_tokens_map.json").symlink_to(tmp_path / "missing")
    (tmp_path / "out").mkdir()
    with pytest.warns(SidecarWarning) as record:
        copied = copy_model_files(src, tmp_path / "out")
    messages = [str(w.message) for w in record]
    assert len(messages) == 4
    assert messages[0].startswith(f"'{src / 'modules.json'}' is not a valid sentence-transformers modules.json (")
    assert messages[0].endswith("); copied as it is")
    assert messages[1].startswith(f"'{src / 'modules.json'}' is not valid JSON (")
    assert messages[2] == (
        f"'{src / 'special_tokens_map.json'}' could not be copied (No such file or directory); the output lacks it"
    )
    assert messages[3].startswith(f"'{src / 'tokenizer_config.json'}' is not valid JSON (")
    assert copied == ["modules.json", "tokenizer_config.json", "vocab.txt"]
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == "{not json"


def test_copy_rejects_missing_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^src_dir '.*nope' is not a directory$"):
        copy_model_files(tmp_path / "nope", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^out_dir '.*nope' is not a directory$"):
        copy_model_files(tmp_path, tmp_path / "nope")


def test_model_card_states_base_method_budget_version_and_quality(tmp_path):
    low_rank_config = json.dumps({"quantization_config": {"quant_method": "rankwise"}})
    write_files(tmp_path, {"modules.json": "[]", "config.json": low_rank_config})
    card = write_model_card(
        tmp_path,
        base_model="org/model",
        method="compress: whiten factorization",
        budget="keep 0.8",
        quality={"perplexity": 17.7881234, "top-1 agreement": 0.81},
    )
    text = card.read_text()
    assert card == tmp_path / "README.md"
    assert text.startswith('---\nbase_model: "org/model"\nlibrary_name: sentence-transformers\ntags:\n- rankwise\n')
    for line in (
        "| base model | `org/model` |",
        "| method | compress: whiten factorization |",
        "| budget | keep 0.8 |",
        f"| rankwise version | {rankwise.__version__} |",
        "| perplexity | 17.7881 |",
        "| top-1 agreement | 0.81 |",
        "import rankwise  # registers the low-rank layers with transformers' from_pretrained",
    ):
        assert line in text.splitlines()
    (tmp_path / "modules.json").unlink()
    (tmp_path / "config.json").write_text("{}")
    card = write_model_card(tmp_path, base_model="b", method="merge: ties", budget="density=0.2", quality=None)
    text = card.read_text()
    assert "library_name: transformers" in text and "import rankwise" not in text
    assert "Not measured when written; `rankwise eval THIS_DIR --ref b` measures it." in text.splitlines()


def test_model_card_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"^budget must be a non-empty one-line string, got 'a\\nb'$"):
        write_model_card(tmp_path, base_model="b", method="m", budget="a\nb", quality=None)
    with pytest.raises(ValueError, match=r"^quality must be a dict of measure -> value or None, got list$"):
        write_model_card(tmp_path, base_model="b", method="m", budget="x", quality=[1.0])


@pytest.fixture
def bert_st_dir(tmp_path):
    path = save_model_dir(tiny_bert(), tmp_path / "bert")
    return write_files(path, {k: v for k, v in ST_FILES.items() if k != "chat_template.jinja"})


def test_save_keeps_the_input_files_and_adds_a_card(bert_st_dir, tmp_path):
    model, _, _ = load_model(bert_st_dir, progress=False)
    factorize_some(model, {"encoder.layer.0.attention.self.query": 4})
    rankwise.save(model, tmp_path / "c", quality={"cosine": 0.99})
    src, out = read_tree(bert_st_dir), read_tree(tmp_path / "c")
    for rel in [
        *ST_FILES.keys() - {"chat_template.jinja"},
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]:
        assert out[rel] == src[rel], rel
    card = out["README.md"].decode()
    assert f'base_model: "{bert_st_dir}"' in card and "| cosine | 0.99 |" in card
    assert "| budget | 1 layers factorized |" in card


def test_delta_apply_and_merge_keep_the_input_files_and_add_a_card(tmp_path):
    base_dir = save_model_dir(tiny_llama(), tmp_path / "base")
    write_files(base_dir, {"chat_template.jinja": ST_FILES["chat_template.jinja"], "extra/notes.json": '{"a": 1}'})
    other = tiny_llama(seed=1)
    other.save_pretrained(tmp_path / "other")
    A, B = torch.randn(2, 32), torch.randn(32, 2)
    q = "model.layers.0.self_attn.q_proj"
    delta = Delta(lora={q: (A, B)}, shapes={q: (32, 32)})
    apply_delta_checkpoint(base_dir, delta, tmp_path / "applied")
    merge_to_dir([tmp_path / "other", base_dir], tmp_path / "merged", "task_arithmetic", base=base_dir, scale=0.5)
    src = read_tree(base_dir)
    kept = [
        "chat_template.jinja",
        "extra/notes.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    for name, method, budget in (
        (
            "applied",
            "delta apply: base + low-rank delta (in memory)",
            "LoRA ranks 2-2, 1 low-rank layers, 128 factor parameters, 0 tensors replaced exactly",
        ),
        (
            "merged",
            f"merge: task_arithmetic of 2 model(s) ({tmp_path / 'other'}, {base_dir})",
            "normalize=False, scale=0.5, weights=None",
        ),
    ):
        out = read_tree(tmp_path / name)
        assert sorted(out) == sorted([*kept, "README.md", "config.json", "model.safetensors"]), name
        assert all(out[rel] == src[rel] for rel in kept), name
        lines = out["README.md"].decode().splitlines()
        assert f"| base model | `{base_dir}` |" in lines and f"| method | {method} |" in lines, name
        assert f"| budget | {budget} |" in lines, name


def test_real_minilm_sidecars_copy_without_warning(tmp_path):
    # all-MiniLM-L6-v2 as shipped names a 2_Normalize folder it lacks: harmless, Normalize loads no files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = copy_model_files(minilm_dir(), tmp_path)
    assert copied == [
        "1_Pooling/config.json",
        "config_sentence_transformers.json",
        "data_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
