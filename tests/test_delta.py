"""Tests for rankwise.delta and its PEFT export: exact recovery, budgets, PEFT logits equality."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from rankwise import apply_delta_, extract_delta  # noqa: E402
from rankwise.delta import allocate_delta_ranks  # noqa: E402
from rankwise.peft_export import load_peft  # noqa: E402

from _tiny_models import tiny_model  # noqa: E402

K = 3  # rank of the known delta added to every Linear weight


def tiny_llama(tied: bool = False, bias: bool = False, intermediate_size: int = 48) -> LlamaForCausalLM:
    """The shared tiny Llama in float64 with a small vocabulary (the deltas cover every Linear, lm_head too)."""
    return tiny_model(
        "llama",
        vocab_size=61,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tied,
        attention_bias=bias,
        dtype=torch.float64,
    )


def low_rank(m: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, k, generator=g, dtype=torch.float64)
    return 0.05 * left @ torch.randn(k, n, generator=g, dtype=torch.float64)


def finetune(base: torch.nn.Module, k: int = K) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``base`` with a rank-``k`` delta on every Linear weight and a changed final norm."""
    ft = copy.deepcopy(base)
    deltas = {}
    with torch.no_grad():
        for i, (name, mod) in enumerate(ft.named_modules()):
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                deltas[name] = low_rank(*mod.weight.shape, k, seed=i)
                mod.weight += deltas[name]
        ft.model.norm.weight += 0.1 * torch.arange(ft.model.norm.weight.numel(), dtype=torch.float64)
    return ft, deltas


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=atol, msg=name)


def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x).logits


def test_full_rank_reproduces_finetuned_weights():
    base = tiny_llama()
    ft, _ = finetune(base)
    delta = extract_delta(base, ft)
    assert set(delta.exact) == {"model.norm.weight"}
    assert delta.relative_error() < 1e-12
    merged = apply_delta_(copy.deepcopy(base), delta)
    assert_same_weights(merged, ft, atol=1e-13)


def test_known_rank_k_delta_recovered_exactly_at_rank_k():
    base = tiny_llama()
    ft, deltas = finetune(base)
    delta = extract_delta(base, ft, rank=K)
    assert set(delta.ranks.values()) == {K}
    for name, D in deltas.items():
        A, B = delta.lora[name]
        assert A.shape == (K, D.shape[1]) and B.shape == (D.shape[0], K)
        assert torch.linalg.norm(B @ A - D) <= 1e-12 * torch.linalg.norm(D)
    assert delta.relative_error() < 1e-12  # no energy beyond rank K, from ||D||_F^2 and the K kept values


def test_rank_below_k_keeps_the_eckart_young_error():
    base = tiny_llama()
    ft, deltas = finetune(base)
    delta = extract_delta(base, ft, rank=1)
    for name, D in deltas.items():
        A, B = delta.lora[name]
        s = torch.linalg.svdvals(D)
        assert math.isclose(float(torch.linalg.norm(D - B @ A)), float(s[1:].norm()), rel_tol=1e-10)
    # relative_error from each layer's ||D||^2 and its kept singular value equals the measured one
    measured = sum(float(torch.linalg.norm(D - delta.lora[n][1] @ delta.lora[n][0]) ** 2) for n, D in deltas.items())
    total = sum(float(torch.linalg.norm(D) ** 2) for D in deltas.values())
    assert math.isclose(delta.relative_error(), math.sqrt(measured / total), rel_tol=1e-10)


def test_keep_budget_is_respected_and_no_triplet_fits_after():
    base = tiny_llama()
    ft, deltas = finetune(base, k=8)
    delta = extract_delta(base, ft, keep=0.2)
    budget = int(0.2 * sum(D.numel() for D in deltas.values()))
    assert delta.dense_params == sum(D.numel() for D in deltas.values())
    used = sum(r * sum(delta.shapes[n]) for n, r in delta.ranks.items())
    assert used == delta.num_params <= budget
    smallest_step = min(sum(D.shape) for D in deltas.values())
    assert budget - used < smallest_step
    # the same allocation as repeatedly taking the best next triplet s^2/(m+n) that still fits
    ranks, left = dict.fromkeys(delta.spectra, 0), budget
    while True:
        fits = [
            (float(s[ranks[n]]) ** 2 / sum(delta.shapes[n]), n)
            for n, s in delta.spectra.items()
            if ranks[n] < s.numel() and sum(delta.shapes[n]) <= left
        ]
        if not fits:
            break
        best = max(fits)[1]
        ranks[best] += 1
        left -= sum(delta.shapes[best])
    assert {n: r for n, r in ranks.items() if r} == delta.ranks
    for n, D in deltas.items():  # the first pass's Gram-eigenvalue spectra are the singular values
        s = torch.linalg.svdvals(D)
        torch.testing.assert_close(delta.spectra[n], s.to(delta.spectra[n].dtype), rtol=0, atol=1e-7 * float(s[0]))
    measured = sum(
        float(torch.linalg.norm(D - (delta.lora[n][1] @ delta.lora[n][0] if n in delta.lora else 0)) ** 2)
        for n, D in deltas.items()
    )
    total = sum(float(torch.linalg.norm(D) ** 2) for D in deltas.values())
    assert math.isclose(math.sqrt(measured / total), delta.relative_error(), rel_tol=1e-9)


def test_equal_costs_greedy_allocation_is_optimal():
    g = torch.Generator().manual_seed(3)
    spectra = {
        f"l{i}": torch.sort(torch.rand(4, generator=g, dtype=torch.float64), descending=True)[0] for i in range(3)
    }
    shapes = dict.fromkeys(spectra, (4, 6))
    ranks = allocate_delta_ranks(spectra, shapes, budget=5 * 10 + 9)  # room for 5 triplets of cost 10
    assert sum(ranks.values()) == 5
    kept = sum(float((spectra[n][:r] ** 2).sum()) for n, r in ranks.items())
    best = max(
        sum(float((spectra[n][:r] ** 2).sum()) for n, r in zip(spectra, rs))
        for rs in itertools.product(range(5), repeat=3)
        if sum(rs) <= 5
    )
    assert math.isclose(kept, best, rel_tol=1e-12)


def test_energy_rule_keeps_the_fraction_with_a_minimal_greedy_prefix():
    base = tiny_llama()
    ft, _ = finetune(base, k=8)
    delta = extract_delta(base, ft, energy=0.9)
    total = sum(float((s**2).sum()) for s in delta.spectra.values())
    kept = total * (1 - delta.relative_error() ** 2)
    assert kept >= 0.9 * total
    last = min(
        (float(s[delta.ranks[n] - 1]) ** 2 / sum(delta.shapes[n]), float(s[delta.ranks[n] - 1]) ** 2)
        for n, s in delta.spectra.items()
        if delta.ranks.get(n, 0) > 0
    )
    assert kept - last[1] < 0.9 * total


def test_peft_loaded_logits_equal_apply_delta(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(bias=True)
    ft, _ = finetune(base)
    with torch.no_grad():
        ft.model.layers[0].self_attn.q_proj.bias += 0.3  # weight and bias changed
        ft.model.layers[1].self_attn.k_proj.weight.copy_(base.model.layers[1].self_attn.k_proj.weight)
        ft.model.layers[1].self_attn.k_proj.bias -= 0.2  # bias only: no factors, still exported
    delta = extract_delta(base, ft, rank=2)
    assert "model.layers.1.self_attn.k_proj" in delta.bias and "model.layers.1.self_attn.k_proj" not in delta.lora
    delta.save_peft(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ours = apply_delta_(copy.deepcopy(base), delta)
    expected = logits(ours)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-12)
    back = load_peft(tmp_path / "adapter")
    assert back.ranks == {**delta.ranks, "model.layers.1.self_attn.k_proj": 1}
    assert_same_weights(apply_delta_(copy.deepcopy(base), back), ours, atol=1e-14)


def test_peft_keeps_a_tied_head_tied_to_a_changed_embedding(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(tied=True)
    ft, _ = finetune(base)
    with torch.no_grad():
        ft.model.embed_tokens.weight[3] += 0.5
    delta = extract_delta(base, ft, rank=K)
    assert set(delta.exact) == {"model.norm.weight", "model.embed_tokens.weight"}  # lm_head is the same tensor
    delta.save_peft(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ours = apply_delta_(copy.deepcopy(base), delta)
    torch.testing.assert_close(logits(ours), logits(ft), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=0, atol=1e-12)


def test_conv1d_orientation_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("gpt2", vocab_size=61, n_positions=16, dtype=torch.float64)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        w = ft.transformer.h[0].attn.c_attn.weight  # Conv1D: stored (in=32, out=96)
        w += low_rank(96, 32, K, seed=1).T
        ft.transformer.h[1].mlp.c_fc.bias += 0.1
    delta = extract_delta(base, ft)
    assert delta.shapes["transformer.h.0.attn.c_attn"] == (96, 32)
    assert_same_weights(apply_delta_(copy.deepcopy(base), delta), ft, atol=1e-13)
    low = extract_delta(base, ft, rank=K)
    low.save_peft(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded), logits(ft), rtol=0, atol=1e-12)


def test_skip_other_drops_norms_and_biases():
    base = tiny_llama(bias=True)
    ft, _ = finetune(base)
    with torch.no_grad():
        ft.model.layers[0].self_attn.q_proj.bias += 0.3
    delta = extract_delta(base, ft, rank=K, exact_other="skip")
    assert delta.exact == {} and delta.bias == {}
    merged = apply_delta_(copy.deepcopy(base), delta)
    assert torch.equal(merged.model.norm.weight, base.model.norm.weight)
    up = merged.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(up, ft.model.layers[0].mlp.up_proj.weight, rtol=0, atol=1e-13)


def test_target_modules_limit_the_factorized_layers():
    base = tiny_llama()
    ft, _ = finetune(base)
    delta = extract_delta(base, ft, rank=K, target_modules=["q_proj", "v_proj"])
    assert sorted(delta.lora) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert "model.layers.0.mlp.up_proj.weight" in delta.exact  # changed but not targeted: stored exactly
    with pytest.raises(ValueError, match=r"^target_modules \['nope'\] match no Linear weight of the base model$"):
        extract_delta(base, ft, target_modules=["nope"])


def test_include_exclude_choose_the_factorized_layers_and_the_rest_follows_exact_other():
    base = tiny_llama()
    ft, _ = finetune(base)
    delta = extract_delta(base, ft, rank=K, include=r"mlp", exclude=r"layers\.0\.")
    assert sorted(delta.lora) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert {"model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"} <= set(delta.exact)
    assert_same_weights(apply_delta_(copy.deepcopy(base), delta), ft, atol=1e-13)  # rank-K deltas: exact
    skipped = extract_delta(base, ft, rank=K, include=r"mlp", exclude=r"layers\.0\.", exact_other="skip")
    assert skipped.exact == {} and sorted(skipped.lora) == sorted(delta.lora)
    merged = apply_delta_(copy.deepcopy(base), skipped)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(
        ValueError,
        match=r"^include='nope' matches no Linear layer of the base model \(of 15, "
        r"e\.g\. lm_head, model\.layers\.0\.mlp\.down_proj, "
        r"model\.layers\.0\.mlp\.gate_proj\)$",
    ):
        extract_delta(base, ft, include="nope")
    with pytest.raises(ValueError, match=r"^exclude='\(' is not a valid regular expression: "):
        extract_delta(base, ft, exclude="(")


def test_save_module_keeps_lm_head_at_full_rank_and_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ft, _ = finetune(base)
    with torch.no_grad():
        ft.lm_head.weight += 0.01 * torch.randn(
            ft.lm_head.weight.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )  # full rank: no rank-K LoRA recovers it
    delta = extract_delta(base, ft, rank=K, save_modules=["lm_head"])
    assert "lm_head" not in delta.lora and torch.equal(delta.exact["lm_head.weight"], ft.lm_head.weight)
    delta.save_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.norm"] and "lm_head" not in config["target_modules"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded), logits(ft), rtol=0, atol=1e-12)
    low = extract_delta(base, ft, rank=K)  # without it, lm_head gets a rank-K LoRA and loses most of its change
    assert "lm_head" in low.lora
    assert float((logits(apply_delta_(copy.deepcopy(base), low)) - logits(ft)).abs().max()) > 1e-4
    unchanged = extract_delta(base, ft, rank=K, save_modules=["layers.0.input_layernorm"], exact_other="skip")
    assert unchanged.exact.keys() == {"model.layers.0.input_layernorm.weight"}  # saved even though unchanged
    assert torch.equal(
        unchanged.exact["model.layers.0.input_layernorm.weight"], base.model.layers[0].input_layernorm.weight
    )
    with pytest.raises(
        ValueError,
        match=r"^save_modules entry 'nope' names no module of the base model \(e\.g\. "
        r"lm_head, model\.embed_tokens, model\.layers\.0\.input_layernorm\)$",
    ):
        extract_delta(base, ft, save_modules=["nope"])


def test_save_module_on_a_tied_head_saves_the_embedding_and_keeps_them_tied(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(tied=True)
    ft, _ = finetune(base)
    with torch.no_grad():
        ft.model.embed_tokens.weight[5] -= 0.3
    delta = extract_delta(base, ft, rank=K, save_modules=["lm_head"], exact_other="skip")
    assert delta.exact.keys() == {"model.embed_tokens.weight"}
    assert delta.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    delta.save_peft(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ours = apply_delta_(copy.deepcopy(base), delta)
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=0, atol=1e-12)
    assert torch.equal(ours.lm_head.weight, ft.model.embed_tokens.weight)


def test_unchanged_model_gives_an_empty_delta():
    base = tiny_llama()
    delta = extract_delta(base, copy.deepcopy(base))
    assert delta.lora == {} and delta.exact == {} and delta.num_params == 0


def test_bad_inputs_raise_one_line_errors():
    base = tiny_llama()
    ft, _ = finetune(base)
    with pytest.raises(
        ValueError,
        match=r"^rank 17 is larger than layer 'model.layers.0.self_attn.k_proj' allows "
        r"\(max 16 for its 16x32 delta\)$",
    ):
        extract_delta(base, ft, rank=17)
    with pytest.raises(ValueError, match=r"^give at most one of rank, keep, energy; got rank and keep$"):
        extract_delta(base, ft, rank=2, keep=0.5)
    with pytest.raises(ValueError, match=r"^keep must be a fraction in \(0, 1\], got 1.5$"):
        extract_delta(base, ft, keep=1.5)
    with pytest.raises(ValueError, match=r"^exact_other must be one of store, skip, got 'all'$"):
        extract_delta(base, ft, exact_other="all")
    other = tiny_llama(intermediate_size=40)
    with pytest.raises(
        ValueError,
        match=r"^models differ in architecture: "
        r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(32, 48\) in base, "
        r"\(32, 40\) in finetuned$",
    ):
        extract_delta(base, other)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError,
        match=r"^delta for 'model.layers.0.mlp.down_proj.weight' has shape \(32, 48\), "
        r"the model's tensor \(32, 40\)$",
    ):
        apply_delta_(other, extract_delta(base, ft, rank=1))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched on error
