"""The outputs of compress / delta apply / merge in the clients people run them with, on the real offline models:
sentence-transformers on a compressed all-MiniLM-L6-v2, chat generation with transformers on SmolLM2."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import rankwise
from rankwise.cli import main
from rankwise.data import builtin_text, token_sequences
from rankwise.delta import Delta, apply_delta_checkpoint
from rankwise.eval import split_sentences
from rankwise.io.models import load_model, model_dir
from rankwise.merging import merge_to_dir

from _tiny_models import minilm_dir

SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

# the point is the files around the weights, not the quality: data-free SVD, uniform ranks, little calibration
CHEAP = {"method": "svd", "allocate": "uniform", "seq_len": 64, "calib_seqs": 2}
PROMPT = "Write a Python function that returns the square of a number."
NEW_TOKENS = 6


def compressed(spec: str, keep: float, out):
    model, tokenizer, _ = load_model(spec, progress=False)
    calib = token_sequences(tokenizer, builtin_text("calib"), CHEAP["seq_len"], CHEAP["calib_seqs"])
    report = rankwise.compress_(model, rankwise.CompressConfig(keep=keep, **CHEAP), calib, progress=False)
    rankwise.save(model, out, report=report)
    return model


@pytest.mark.slow
def test_sentence_transformers_loads_compressed_minilm(tmp_path, capsys):
    out = tmp_path / "mini"
    compressed("minilm", 0.8, out)
    original, st = (SentenceTransformer(str(d), device="cpu") for d in (minilm_dir(), out))
    names = [type(m).__name__ for m in st]
    assert names == [type(m).__name__ for m in original] == ["Transformer", "Pooling", "Normalize"]
    assert st[1].get_config_dict() == original[1].get_config_dict()
    assert st.max_seq_length == original.max_seq_length == 256

    sentences = split_sentences(builtin_text("eval"))[:32]
    emb = st.encode(sentences, convert_to_tensor=True).double()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(sentences), dtype=torch.float64), atol=1e-6)
    # the same embeddings from rankwise.load + all-MiniLM-L6-v2's pooling (mean over tokens) and normalization
    model, tokenizer = rankwise.load(out), AutoTokenizer.from_pretrained(minilm_dir())
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"][..., None].double()
    manual = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (emb - manual).abs().max() < 1e-6

    cosine = float(F.cosine_similarity(emb, original.encode(sentences, convert_to_tensor=True).double()).mean())
    assert cosine < 0.999  # the compressed weights were loaded, not the original ones
    capsys.readouterr()
    assert main(["eval", str(out), "--ref", "minilm", "--sentences", "32"]) == 0
    printed = re.search(
        r"mean cosine similarity to minilm (\d\.\d{5}) over 32 sentences of built-in held-out text; "
        r"through the model's sentence-transformers pipeline \(Transformer -> Pooling -> Normalize\)",
        capsys.readouterr().out,
    )
    assert printed and abs(float(printed.group(1)) - cosine) < 1e-4


def chat_generate(model, tokenizer) -> list[int]:
    """Greedy tokens of the answer to PROMPT, formatted with the tokenizer's chat template."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert tokenizer.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids[0, enc["input_ids"].shape[1] :].tolist()


def reload_and_generate(path, source) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == (source / "chat_template.jinja").read_text()
    assert (path / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert (path / "README.md").is_file()
    tokens = chat_generate(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
    assert len(tokens) == NEW_TOKENS  # the first tokens of an answer to this prompt are no end of turn
    return tokens


@pytest.fixture(scope="module")
def smollm2_source():
    return model_dir("smollm2", progress=False)  # the GGUF's cached conversion: tokenizer + chat template live here


@pytest.mark.slow
def test_chat_generation_on_compressed_smollm2(smollm2_source, tmp_path):
    model = compressed("smollm2", 0.9, tmp_path / "smol")
    expected = chat_generate(model, AutoTokenizer.from_pretrained(smollm2_source))
    assert reload_and_generate(tmp_path / "smol", smollm2_source) == expected


@pytest.mark.slow
def test_chat_generation_on_delta_apply_and_merge_outputs(smollm2_source, tmp_path):
    name = "model.layers.0.self_attn.q_proj"
    gen = torch.Generator().manual_seed(0)
    A, B = 0.05 * torch.randn(4, 576, generator=gen), 0.05 * torch.randn(576, 4, generator=gen)
    apply_delta_checkpoint("smollm2", Delta(lora={name: (A, B)}, shapes={name: (576, 576)}), tmp_path / "applied")
    base, tokenizer, _ = load_model("smollm2", progress=False)
    with torch.no_grad():
        base.get_submodule(name).weight.add_((B.double() @ A.double()).float())
    assert reload_and_generate(tmp_path / "applied", smollm2_source) == chat_generate(base, tokenizer)

    merge_to_dir([smollm2_source, tmp_path / "applied"], tmp_path / "merged", "linear")
    with torch.no_grad():
        base.get_submodule(name).weight.sub_((0.5 * (B.double() @ A.double())).float())  # the average of the two
    assert reload_and_generate(tmp_path / "merged", smollm2_source) == chat_generate(base, tokenizer)
