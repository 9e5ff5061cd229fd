"""The LM head (tied to the input embedding or not) as one target of the global allocation: include_head."""

import copy
import dataclasses
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.blocks import BlockRunner, InMemorySource
from rankwise.calibrate import calibration_loss, collect_stats
from rankwise.compress import CompressConfig, compress_
from rankwise.layers.embedding import LowRankEmbedding, TiedLowRankHead
from rankwise.layers.linear import LowRankLinear

from _tiny_models import small_llama, tiny_bert, tiny_model

CALIB = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(5))
CONFIG = CompressConfig(keep=0.3, fisher_seqs=8, min_rank=2, include_head=True)


def llama(tied: bool = True, dtype=torch.float32):
    """Vocabulary 96, hidden 64: the head (96x64) is a sizeable part of the budget, as in SmolLM2; its table
    is of rank 12 plus noise (a random table's flat spectrum would always stay dense)."""
    return low_rank_tables(small_llama(0, dtype, tie_word_embeddings=tied))


def gemma2(dtype=torch.float32):
    """The same sizes as :func:`llama` in Gemma2, whose embedding scales its rows by sqrt(hidden) = 8; no logit
    soft-capping (the head's output is then the model's logits, as in Llama)."""
    sizes = {"hidden_size": 64, "intermediate_size": 112, "head_dim": 16, "query_pre_attn_scalar": 16}
    return low_rank_tables(
        tiny_model("gemma2", 0, dtype, vocab_size=96, final_logit_softcapping=None, tie_word_embeddings=True, **sizes)
    )


def low_rank_tables(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for table in {id(t): t for t in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
            low = torch.randn(96, 12, generator=g) @ torch.randn(12, 64, generator=g) / 12
            table.copy_(low + 0.02 * torch.randn(96, 64, generator=g))
    return model


def logits(model, ids=CALIB[:2]):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def head_inputs_embedding_gradients_and_predictions(model):
    """On CALIB, one sequence at a time with the calibration loss (mean next-token cross-entropy of the
    sequence): the head's inputs (tokens, hidden), the loss gradients at the embedding output (tokens, hidden)
    and the model's next-token distributions at the scored positions (n_seqs * (seq_len - 1), vocab)."""
    inputs, grads, predictions, outs = [], [], [], []
    pre = model.lm_head.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().double()))
    emb = model.model.embed_tokens.register_forward_hook(lambda m, args, out: out.requires_grad_(True))
    keep = model.model.embed_tokens.register_forward_hook(lambda m, args, out: outs.append(out))
    for seq in CALIB:
        ids = seq[None]
        with torch.enable_grad():
            output = model(input_ids=ids)
            (g,) = torch.autograd.grad(calibration_loss(model, ids, output, 0), outs[-1])
        grads.append(g.detach().double().reshape(-1, g.shape[-1]))
        predictions.append(torch.softmax(output.logits[0, :-1].detach().double(), -1))
    for h in (pre, emb, keep):
        h.remove()
    return torch.cat(inputs).reshape(-1, inputs[0].shape[-1]), torch.cat(grads), torch.cat(predictions)


def head_row(report):
    return next(layer for layer in report.layers if layer.name == "lm_head")


@pytest.mark.parametrize(
    ("arch", "weight", "fisher_seqs"), [("llama", 1.0, 8), ("llama", 0.5, 8), ("gemma2", 1.0, 8), ("llama", 1.0, 4)]
)
def test_tied_head_is_one_target_priced_in_the_block_layers_metric(arch, weight, fisher_seqs):
    build = {"llama": llama, "gemma2": gemma2}[arch]
    model, dense = build(dtype=torch.float64), build(dtype=torch.float64)
    E = dense.model.embed_tokens.weight.detach().double()
    config = dataclasses.replace(CONFIG, head_weight=weight, fisher_seqs=fisher_seqs)
    report = compress_(model, config, CALIB, progress=False)
    row = head_row(report)
    assert row.shape == (96, 64) and row.rank is not None and row.rank < 38
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, LowRankEmbedding) and isinstance(head, TiedLowRankHead) and head._embedding is emb
    assert emb.rank == row.rank and row.params_after == row.rank * (96 + 64)
    # one budget over the blocks and the table, the table counted once
    assert report.params_after <= 0.3 * report.params_before
    before = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in model.parameters()) == before - report.params_before + report.params_after
    # the allocator's predicted loss of the table at its rank is, exactly, the head's output error on the
    # calibration inputs weighted by the logits' expected squared loss gradients p (1 - p) (the Gauss-Newton
    # diagonal: every row priced, not only the calibration text's next tokens) plus the second-order cost of
    # the same error in the input embedding, each token weighted by how often the model predicts it; all but
    # the embedding's gradients from every calibration sequence (a forward suffices), not only the first
    # fisher_seqs
    X, G, P = head_inputs_embedding_gradients_and_predictions(dense)
    n, L = CALIB.shape
    G = G[: fisher_seqs * L]
    scale = 8.0 if arch == "gemma2" else 1.0  # Gemma2's embedding output: its rows times sqrt(hidden)
    assert emb.scale == scale
    E_r = emb.dense_weight()
    dE = E - E_r
    g = (P * (1 - P)).sum(0) / ((L - 1) ** 2 * n * L)  # dL/dlogit = (p - e_y) / (L - 1) for a row's mean loss
    head_loss = float((g[:, None] * (dE @ X.T) ** 2).sum()) / X.shape[0]
    freq = (torch.bincount(CALIB[:, 0], minlength=96).double() + P.sum(0)) / (n * L)
    gram = scale**2 * G.T @ G / G.shape[0]  # the gradient at the table's rows, Kronecker-factored as for the blocks
    embedding_loss = float(((dE @ gram) * dE).sum(1) @ freq)
    # rel 2e-4: the pipeline accumulates X^T X from float32 products, and this tail is ~1e-6 of the total
    assert row.loss == pytest.approx(weight * (head_loss + embedding_loss), rel=2e-4)
    assert embedding_loss > 0.05 * head_loss  # the embedding term is not negligible here
    # the embedding and the head compute with the same factors, without forming E_r
    ids = CALIB[:2]
    torch.testing.assert_close(emb(ids), scale * E_r[ids], rtol=1e-12, atol=1e-12)
    h = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(head(h), h @ E_r.T, rtol=1e-12, atol=1e-12)


def test_tied_head_beats_the_blocks_alone_at_the_same_total_parameters_on_calibration_loss():
    with_head, blocks = llama(), llama()
    report = compress_(with_head, CONFIG, CALIB, progress=False)
    total_dense = sum(p.numel() for p in blocks.parameters())
    total = sum(p.numel() for p in with_head.parameters())
    block_params = report.params_before - 96 * 64
    keep = (total - (total_dense - block_params)) / block_params  # the same total, spent on the blocks alone
    compress_(blocks, CompressConfig(keep=keep, fisher_seqs=8, min_rank=2), CALIB, progress=False)
    assert sum(p.numel() for p in blocks.parameters()) <= total

    def loss(model):
        out = logits(model, CALIB)
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 96), CALIB[:, 1:].reshape(-1)).item()

    assert loss(with_head) < loss(blocks)


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("gemma2", True)])
def test_factorized_head_reloads_with_identical_logits(tmp_path, arch, tied):
    model = llama(tied) if arch == "llama" else gemma2()
    report = compress_(model, CompressConfig(keep=0.3, fisher_seqs=8, min_rank=2, include_head=True), CALIB)
    assert head_row(report).rank is not None
    if not tied:
        assert isinstance(model.lm_head, LowRankLinear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    ref = logits(model)
    rankwise.save(model, tmp_path / "out")
    for loaded in (rankwise.load(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
        assert type(loaded.lm_head) is type(model.lm_head)
        if tied:
            assert loaded.lm_head._embedding is loaded.model.embed_tokens
            assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_bad_include_head_inputs_are_named_and_leave_the_model_untouched():
    with pytest.raises(
        ValueError,
        match=r"^include_head needs an allocator with loss gradients \(the head is priced from the loss-head pass\) "
        r"and update=False; got allocate='uniform', update=False$",
    ):
        CompressConfig(include_head=True, allocate="uniform")
    with pytest.raises(ValueError, match=r"^include_head must be True or False, got 1$"):
        CompressConfig(include_head=1)
    with pytest.raises(ValueError, match=r"^head_weight must be a number in \[1e-06, 1e\+06\], got 0$"):
        CompressConfig(include_head=True, head_weight=0)
    bert = tiny_bert()
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(
        ValueError,
        match=r"^include_head: BertModel has no LM head; accepted: a model whose get_output_embeddings\(\) is an "
        r"nn.Linear \(a causal LM\)$",
    ):
        compress_(bert, CONFIG, CALIB, progress=False)
    assert all(torch.equal(v, bert.state_dict()[k]) for k, v in before.items())
    model = llama()
    config = CompressConfig(keep=0.5, fisher_seqs=8, include=r"layers|lm_head", include_head=True)
    with pytest.raises(ValueError, match=r"^include_head: 'lm_head' is also matched by include=; drop it"):
        compress_(model, config, CALIB, progress=False)
    stats = collect_stats(model, {"lm_head": model.lm_head}, CALIB, fisher_seqs=8, progress=False)
    with pytest.raises(ValueError, match=r"^the LM head's statistics come from the loss-head pass: pass calib"):
        compress_(model, CONFIG, CALIB, stats=stats, progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("arch", "embedding", "stack"),
    [("llama", "model.embed_tokens", "model.layers"), ("bert", "embeddings.word_embeddings", "encoder.layer")],
)
def test_the_embedding_gradient_is_taken_at_the_embedding_output_not_the_block_stack_input(arch, embedding, stack):
    # BERT normalizes (LayerNorm) the embedding sum before its first block: the two gradients differ there
    model = tiny_model(arch, 0, torch.float64, vocab_size=96)
    ids, emb, first = CALIB[:2], model.get_submodule(embedding), model.get_submodule(stack)[0]

    def gradient_at(register):
        leaves = []
        handle = register(leaves)
        with torch.enable_grad():
            loss = calibration_loss(model, ids, model(input_ids=ids, attention_mask=torch.ones_like(ids)), 0)
            (g,) = torch.autograd.grad(loss, leaves[0])
        handle.remove()
        return g

    def at_embedding(leaves):
        return emb.register_forward_hook(lambda m, a, y: leaves.append(y.detach().requires_grad_(True)) or leaves[0])

    def at_stack(leaves):
        def pre(m, args, kwargs):
            if "hidden_states" in kwargs:
                leaves.append(kwargs["hidden_states"].detach().requires_grad_(True))
                return args, {**kwargs, "hidden_states": leaves[0]}
            leaves.append(args[0].detach().requires_grad_(True))
            return (leaves[0], *args[1:]), kwargs

        return first.register_forward_pre_hook(pre, with_kwargs=True)

    g_emb, g_stack = gradient_at(at_embedding), gradient_at(at_stack)
    runner = BlockRunner(InMemorySource(model, stack, torch.device("cpu")), torch.device("cpu"), torch.float64)
    runner.calls(ids)
    torch.testing.assert_close(runner.embedding_grad(ids, emb, g_stack), g_emb, rtol=1e-10, atol=1e-14)
    assert torch.equal(g_emb, g_stack) == (arch == "llama")


def test_an_embedding_that_is_not_its_rows_times_a_constant_is_named():
    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    with pytest.raises(
        ValueError,
        match=r"^Shifted: its output is not its table's rows times a constant, so a factorized table cannot stand "
        r"in for it; accepted: nn.Embedding and subclasses that scale its rows$",
    ):
        LowRankEmbedding.from_dense(Shifted(10, 4), rank=2)
    plain = torch.nn.Embedding(10, 4)
    assert "scale" not in LowRankEmbedding.from_dense(plain, rank=2).spec()  # plain tables' specs unchanged


@pytest.mark.parametrize("tied", [True, False])
def test_reports_name_a_tied_table_by_both_of_its_uses(tmp_path, tied):
    from rankwise.io.checkpoint import REPORT_FILE
    from rankwise.report import load_run

    report = compress_(llama(tied), CONFIG, CALIB, progress=False)
    row = head_row(report)
    label = "model.embed_tokens + lm_head (tied)" if tied else "lm_head"
    assert row.tied == ("model.embed_tokens" if tied else None) and row.label == label
    assert "lm_head" in report.ranks and "model.embed_tokens" not in report.ranks  # module names, the table once
    rows = [line for line in report.summary().splitlines() if "96x64" in line]
    assert len(rows) == 1 and rows[0].startswith(f"{label} ") and rows[0].split()[-3] == f"{row.rank}-{row.rank}"
    (tmp_path / REPORT_FILE).write_text(report.to_json())  # what `rankwise compress` writes, `rankwise report` reads
    shown = {layer.name: layer.rank for layer in load_run(tmp_path).layers}
    assert shown[label] == row.rank and len(shown) == len(report.layers)


@pytest.mark.parametrize("tied", [True, False])
def test_the_disk_estimate_of_a_streamed_run_covers_what_include_head_spills(tmp_path, monkeypatch, tied):
    import rankwise.streamed
    from rankwise.io.stream import CheckpointSource
    from rankwise.streamed import _spill_bytes, compress_checkpoint, head_spill_bytes
    from rankwise.targets import find_targets
    from rankwise.workdir import WorkDir

    from _tiny_models import save_model_dir

    src = save_model_dir(llama(tied), tmp_path / "m")
    source = CheckpointSource(src, AutoModelForCausalLM, None, torch.device("cpu"), torch.float32)
    try:
        targets = find_targets(source.model)
        extra = _spill_bytes(source, targets, CONFIG, CALIB) - _spill_bytes(
            source, targets, dataclasses.replace(CONFIG, include_head=False), CALIB
        )
        assert extra == head_spill_bytes(source.model)
    finally:
        source.close()
    # tied: statistics 64^2 + 2 * 96 and factors U 96x64, S 64, Vh 64x64, spectrum 64, all float64;
    # untied: float32 factors below the dense 96x64 plus S and the spectrum (64 each)
    assert extra == (8 * (64 * 64 + 2 * 96) + 8 * (96 * 64 + 64 + 64 * 64 + 64) if tied else 4 * (96 * 64 + 2 * 64))
    written = {}  # tensor bytes of every spill file, as the run saves them
    save = WorkDir.save

    def recording_save(self, name, obj):
        tensors = obj.values() if isinstance(obj, dict) else ()
        tensors = [t for v in tensors for t in (v.values() if isinstance(v, dict) else [v])]
        written[name] = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        save(self, name, obj)

    monkeypatch.setattr(rankwise.streamed.WorkDir, "save", recording_save)
    compress_checkpoint(src, tmp_path / "out", CONFIG, CALIB, device="cpu", progress=False)
    head = sum(n for name, n in written.items() if name in ("head-stats.pt", "factors-head.pt"))
    # untied: the largest allocatable rank 38 (38 * (96 + 64) < 96 * 64 < 39 * (96 + 64)), float32
    assert head == extra if tied else head == 4 * (96 * 38 + 38 + 38 * 64 + 64) <= extra


def test_sweep_refuses_include_head_before_writing(tmp_path):
    from rankwise.sweep import sweep

    from _tiny_models import save_model_dir

    src = save_model_dir(llama(), tmp_path / "m")
    with pytest.raises(
        ValueError,
        match=r"^include_head: sweep measures and writes the block layers only; accepted: include_head=False, or "
        r"rankwise\.streamed\.compress_checkpoint at each keep$",
    ):
        sweep(src, tmp_path / "s", [0.3], CONFIG, CALIB, choose=lambda rows: 0.3, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_info_says_which_head_computes_with_a_tied_table(tmp_path, capsys):
    from rankwise.cli import main

    model = llama()
    rank = head_row(compress_(model, CONFIG, CALIB, progress=False)).rank
    rankwise.save(model, tmp_path / "c")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^model\.embed_tokens +96x64 +{rank} +{rank * 160:,} +6,144 ", text, re.M)
    assert re.search(r"^tied: lm_head computes with the factors of model\.embed_tokens above \(no tensors", text, re.M)
