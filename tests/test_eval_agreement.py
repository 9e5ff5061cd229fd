"""KL divergence / top-1 agreement with a reference (held-out text and chat answers), API and `rankwise eval`, checked
against computations written out here."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from rankwise.cli import main
from rankwise.data import CHAT_PROMPTS, builtin_text, chat_prompts, token_sequences
from rankwise.eval import chat_agreement, chat_prompt_ids, next_token_agreement, perplexity
from rankwise.io.models import load_model

from _tiny_models import minilm_dir, save_model_dir, tiny_bert, tiny_llama, token_ids

TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
MAX_NEW = 6


def sharp_llama(seed: int = 0):
    """A tiny float64 Llama whose next-token distributions are far from uniform (scaled final norm)."""
    model = tiny_llama(seed).double()
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    return model


def perturbed(model, scale: float = 1.0, seed: int = 5):
    """``model`` with Gaussian noise of ``scale`` times each block matrix's std added to it."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


@pytest.fixture(scope="module")
def pair():
    ref = sharp_llama()
    return perturbed(ref), ref


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def expected_agreement(model, ref, ids):
    """KL(ref || model), top-1 agreement and both perplexities, from whole-batch forwards."""
    with torch.no_grad():
        logq = F.log_softmax(model(input_ids=ids).logits[:, :-1], dim=-1)
        logp = F.log_softmax(ref(input_ids=ids).logits[:, :-1], dim=-1)
        n = ids[:, 1:].numel()
        kl = float(F.kl_div(logq.reshape(n, -1), logp.reshape(n, -1), log_target=True, reduction="sum")) / n
        top1 = float((logq.argmax(-1) == logp.argmax(-1)).double().mean())
        targets = ids[:, 1:, None]
        ppl = [math.exp(-float(lp.gather(-1, targets).mean())) for lp in (logq, logp)]  # (transformers' loss: float32)
    return kl, top1, *ppl


def test_kl_and_top1_equal_a_direct_computation(pair):
    model, ref = pair
    ids = token_ids(3, 24)
    a = next_token_agreement(model, ref, ids, progress=False)
    kl, top1, ppl, ref_ppl = expected_agreement(model, ref, ids)
    assert a.tokens == 3 * 23
    assert 0.05 < kl and 0.2 < top1 < 0.95  # a pair that is neither identical nor unrelated
    assert a.kl == pytest.approx(kl, abs=1e-6, rel=1e-6)
    assert a.top1 == pytest.approx(top1, abs=1e-6)
    assert a.perplexity == pytest.approx(ppl, rel=1e-6) and a.ref_perplexity == pytest.approx(ref_ppl, rel=1e-6)
    assert a.perplexity == perplexity(model, ids, progress=False)  # the same float64 route, bit for bit


def test_a_model_agrees_with_itself(pair):
    ref = pair[1]
    a = next_token_agreement(ref, ref, token_ids(2, 16), progress=False)
    assert a.kl == pytest.approx(0.0, abs=1e-12) and a.top1 == 1.0 and a.perplexity == a.ref_perplexity


def greedy_without_cache(model, ids, stop: int, max_new: int) -> list[int]:
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax())
            answer.append(token)
            if token == stop:
                break
    return answer


def test_chat_top1_equals_a_direct_computation(pair, chat_tokenizer):
    model, ref = pair
    prompts = chat_prompts(4)
    agreed = total = 0
    for prompt in prompts:
        ids = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert chat_prompt_ids(chat_tokenizer, prompt).tolist() == ids
        answer = greedy_without_cache(ref, ids, ref.generation_config.eos_token_id, MAX_NEW)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0]
        for k, token in enumerate(answer):
            agreed += int(logits[len(ids) - 1 + k].argmax()) == token
            total += 1
    c = chat_agreement(model, ref, chat_tokenizer, prompts, max_new_tokens=MAX_NEW, progress=False)
    assert (c.tokens, c.prompts) == (total, 4)
    assert 0 < agreed < total
    assert c.top1 == pytest.approx(agreed / total, abs=1e-12)
    assert chat_agreement(ref, ref, chat_tokenizer, prompts, max_new_tokens=MAX_NEW, progress=False).top1 == 1.0


def test_chat_needs_a_template_and_valid_arguments(pair):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    with pytest.raises(ValueError, match=r"^the tokenizer has no chat template, so chat prompts cannot be formatted$"):
        chat_agreement(*pair, tokenizer, ["hi"], progress=False)
    with pytest.raises(ValueError, match=r"^max_new_tokens must be an int >= 1, got 0$"):
        chat_agreement(*pair, tokenizer, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^the number of chat prompts must be an int from 1 to 24, got 25$"):
        chat_prompts(25)
    assert len(CHAT_PROMPTS) == len(set(CHAT_PROMPTS)) == 24


@pytest.fixture(scope="module")
def dirs(pair, chat_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    model_dir, ref_dir = (save_model_dir(m, root / name) for m, name in zip(pair, ("model", "ref")))
    chat_tokenizer.save_pretrained(model_dir)
    return model_dir, ref_dir


def test_cli_prints_the_same_figures(chat_tokenizer, dirs, capsys):
    model_dir, ref_dir = dirs
    pair = [load_model(d, progress=False)[0] for d in dirs]  # as the CLI reads them (RoPE tables rebuilt in float32)
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--ref",
                str(ref_dir),
                "--tokens",
                "96",
                "--seq-len",
                "32",
                "--chat",
                "3",
                "--chat-tokens",
                str(MAX_NEW),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    ids = token_sequences(chat_tokenizer, builtin_text("eval"), 32, 3, what="evaluation")
    kl, top1, ppl, ref_ppl = expected_agreement(*pair, ids)
    c = chat_agreement(*pair, chat_tokenizer, chat_prompts(3), max_new_tokens=MAX_NEW, progress=False)
    assert f"perplexity {ppl:.3f} on 96 tokens (3 x 32) of built-in held-out text" in out
    assert f"reference perplexity {ref_ppl:.3f}; ratio {ppl / ref_ppl:.3f}" in out
    assert (
        f"KL divergence to reference {kl:.5f} nats/token; next-token top-1 agreement {top1:.4f} (93 predicted tokens)"
    ) in out
    assert (
        f"chat: top-1 agreement {c.top1:.4f} along the reference's greedy answers to 3 built-in prompts "
        f"({c.tokens} answer tokens, at most {MAX_NEW} each)"
    ) in out


def run_bad(argv, capsys, match):
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not re.search(r"\| *\d+/\d+ \[", line)]
    assert len(err) == 1 and re.search(match, err[0]), err


def test_cli_chat_bad_input(dirs, tmp_path, capsys):
    model_dir, ref_dir = dirs
    run_bad(
        ["eval", str(ref_dir), "--ref", str(model_dir), "--chat", "2"],
        capsys,
        r"^rankwise eval: error: --chat needs a chat template, and model '.*/ref' has none "
        r"\(no chat_template in its "
        r"tokenizer files\)$",
    )
    run_bad(
        ["eval", str(model_dir), "--chat", "2"],
        capsys,
        r"^rankwise eval: error: --chat needs --ref MODEL: it measures agreement with the reference's answers$",
    )
    for n in ("0", "25"):
        run_bad(
            ["eval", str(model_dir), "--ref", str(ref_dir), "--chat", n],
            capsys,
            rf"^rankwise eval: error: --chat must be an int from 1 to 24 \(built-in prompts\), got {n}$",
        )
    bert = save_model_dir(tiny_bert(), tmp_path / "bert")
    run_bad(
        ["eval", str(bert), "--ref", str(bert), "--chat", "2"],
        capsys,
        r"^rankwise eval: error: --chat applies to causal LMs; model '.*/bert' is an encoder$",
    )
