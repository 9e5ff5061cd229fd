"""The block-by-block compression passes: calibrate, loss gradients, factorize, allocate, (re)calibrate sequentially.

Memory is one block plus the calibration activations at one block boundary: statistics, gradients and
factors of finished blocks are spilled to a :class:`~rankwise.workdir.WorkDir`. The passes:

A. forward, block order, every calibration sequence: each block's input statistics (``X^T X``,
   ``sum |x|``); the inputs of the loss-gradient sequences are kept. Without loss gradients the block is
   factorized right away; with them its statistics are spilled until B is done.
B. (loss gradients) the loss head on the last block's output, then backward in reverse block order,
   recomputing each block's forward from its stored input (checkpointing across blocks): the squared
   output gradient of every target layer, equal to a whole-model backward up to round-off.
C. (loss gradients) block order: factorize each layer in its metric, spill the factors up to the
   largest rank the layer can receive, keep its loss-per-triplet curve.
D. (optional, ``sequential``) after the global allocation, block order: each block's statistics on the
   outputs of the blocks before it *after* their compression, its layers factorized again at their
   allocated ranks (SVD-LLM V2, llm-compressor's sequential pipeline).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import LayerCost
from .blocks import BlockRunner, BlockSource
from .calibrate import CalibStats, InputStats, LayerHooks, _bar, batch_spans, predicted_token_moments
from .formats.svd import SVD
from .head import factorize_tied_table
from .layers.embedding import embedding_scale
from .layers.linear import LowRankLinear, dense_weight
from .targets import replace_module
from .workdir import WorkDir

BATCH_SIZE = 4
HEAD_NEEDS_CALIB = "the LM head's statistics come from the loss-head pass: pass calib, not stats= (include_head)"


@dataclass
class LayerCurve:
    """One target layer after pass A/C: its block, its allocator input, its spill file."""

    name: str
    block: int
    cost: LayerCost
    seconds: float  # factorization wall time


def targets_by_block(targets: dict[str, nn.Module], stack_name: str, num_blocks: int) -> list[list[str]]:
    """Target names grouped by the block holding them; a target outside the block stack is an error."""
    groups: list[list[str]] = [[] for _ in range(num_blocks)]
    pattern = re.compile(rf"^{re.escape(stack_name)}\.(\d+)\.")
    for name in targets:
        m = pattern.match(name)
        if m is None:
            raise ValueError(
                f"layer {name!r} is outside the block stack {stack_name!r}; the block-by-block pipeline compresses "
                f"layers inside {stack_name}.N only (adjust include= / exclude=)"
            )
        groups[int(m.group(1))].append(name)
    return groups


def _stats_state(stats: dict[str, InputStats]) -> dict:
    """Spillable form of one block's statistics; shared objects stored once (``leader`` names)."""
    out, leaders = {}, {}
    for name, st in stats.items():
        if id(st) in leaders:
            out[name] = {"leader": leaders[id(st)]}
        else:
            leaders[id(st)] = name
            out[name] = {"gram": st.gram.cpu(), "abs_sum": st.abs_sum.cpu(), "count": torch.tensor(st.count)}
    return out


def spilled_stats(work: WorkDir, i: int, device: torch.device) -> dict[str, InputStats]:
    """The input statistics of block ``i``'s targets, as pass A spilled them."""
    state, stats = work.load(f"stats-{i}.pt"), {}
    for name, d in state.items():
        if "leader" not in d:
            stats[name] = InputStats(d["gram"].to(device), d["abs_sum"].to(device), int(d["count"]))
    for name, d in state.items():
        if "leader" in d:
            stats[name] = stats[d["leader"]]
    return stats


class Pipeline:
    """The passes over the blocks of ``source`` for one compression run.

    Parameters
    ----------
    source : where block weights come from.
    targets : qualified name -> layer for every layer to factorize (inside the block stack).
    config : :class:`rankwise.CompressConfig`.
    factorize : ``(W, stats, name, cache) -> SVD`` in the method's metric (``rankwise.metric.factorize``).
    cost : ``(layer, SVD, stats, name) -> LayerCost``.
    work : the spill directory.
    head : ``(qualified name, nn.Linear, tied embedding's name or None)`` of the LM head, factorized as one more
        target from the loss-head pass (its input: the final-norm output; its output weights: the logits'
        expected squared loss gradients), or None. A tied table is also priced as the input embedding
        (:func:`rankwise.head.factorize_tied_table`), from the loss gradient at the embedding's output.
    keep_stats : spill every block's input statistics (also without loss gradients, also for data-free methods)
        and keep them for :meth:`block_stats` after the passes (the quantizing runs' write pass reads them).
    """

    def __init__(
        self,
        source: BlockSource,
        targets,
        config,
        factorize,
        cost,
        work: WorkDir,
        *,
        device: torch.device,
        dtype: torch.dtype,
        progress: bool = True,
        head: tuple[str, nn.Module, bool] | None = None,
        keep_stats: bool = False,
    ):
        self.head, self.keep_stats = head, keep_stats
        if head is not None and not config.needs_loss_gradients:
            raise ValueError(f"the LM head is priced from the loss-head pass; allocate={config.allocate!r} has none")
        self.source, self.config, self.work, self.progress = source, config, work, progress
        self.factorize, self.cost = factorize, cost
        self.device = torch.device(device)
        self.runner = BlockRunner(source, device, dtype)
        self.groups = targets_by_block(targets, source.stack_name, source.num_blocks)
        self.needs_grad = config.needs_loss_gradients
        self.needs_inputs = config.method != "svd" or keep_stats
        self.grad_sq: dict[str, torch.Tensor] = {}

    def _targets(self, i: int) -> dict[str, nn.Module]:
        return {n: self.source.model.get_submodule(n) for n in self.groups[i]}

    def _bar(self, it, desc: str):
        return _bar(it, self.progress, desc)

    # -- pass A ------------------------------------------------------------------------------------------
    def block_inputs(self, calib: torch.Tensor) -> tuple[list[tuple[int, int]], list[torch.Tensor], list]:
        """Batches, the block stack's input for each, and each batch's per-block call arguments."""
        spans = batch_spans(calib.shape[0], self.config.fisher_seqs if self.needs_grad else 0, BATCH_SIZE)
        hidden, calls = [], []
        for a, b in spans:
            h, c = self.runner.calls(calib[a:b])
            hidden.append(h)
            calls.append(c)
        return spans, hidden, calls

    def calibrate(self, calib: torch.Tensor, given: CalibStats | None = None) -> list[LayerCurve]:
        """Passes A to C; returns every layer's curve, in model order, with factors spilled per block."""
        if given is not None or not (self.needs_inputs or self.needs_grad):
            self.grad_sq = dict(given.out_grad_sq) if given is not None else {}
            return self._factorize_all(given)
        spans, hidden, calls = self.block_inputs(calib)
        n_grad = sum(1 for a, _ in spans if a < self.config.fisher_seqs) if self.needs_grad else 0
        start = 0
        if self.work.has("forward.pt"):  # resume pass A after its last finished block
            state = self.work.load("forward.pt")
            start, hidden = state["next"], state["hidden"]
        for i in self._bar(range(start, self.source.num_blocks), "calibrate blocks"):
            block = self.source.load_block(i)
            targets = self._targets(i)
            if n_grad:
                self.work.save(f"grad-in-{i}.pt", hidden[:n_grad])
            with torch.no_grad(), LayerHooks(targets, self.device) as hooks:
                for j in range(len(spans)):
                    hooks.new_forward()
                    hidden[j] = self.runner.run(block, hidden[j], calls[j][i]).to("cpu")
            if self.needs_grad or self.keep_stats:
                self.work.save(f"stats-{i}.pt", _stats_state(hooks.stats))
            if not self.needs_grad:
                self._factorize_block(i, targets, CalibStats(hooks.stats))
            self.source.release_block(i)
            self.work.save("forward.pt", {"next": i + 1, "hidden": hidden})
        if self.needs_grad:
            self._backward(calib, spans, hidden, calls, n_grad)
            for i in self._bar(range(self.source.num_blocks), "factorize blocks"):
                if not self._done(i):
                    self.source.load_block(i)
                    self._factorize_block(i, self._targets(i), self.block_stats(i))
                    self.source.release_block(i)
        return self._curves()

    def block_stats(self, i: int) -> CalibStats:
        """Block ``i``'s spilled input statistics (with loss gradients, or ``keep_stats``) and the loss gradients."""
        return CalibStats(spilled_stats(self.work, i, self.device), self.grad_sq)

    # -- pass B ------------------------------------------------------------------------------------------
    def _backward(self, calib, spans, last_hidden, calls, n_grad: int) -> dict[str, torch.Tensor]:
        """Squared output gradients of every target, mean over the tokens of the first ``n_grad`` batches."""
        if self.work.has("backward.pt"):
            state = self.work.load("backward.pt")
        else:
            grads = self._loss_head(calib, spans, last_hidden, n_grad)
            state = {"next": self.source.num_blocks - 1, "grads": grads, "grad_sq": {}}
        spans = spans[:n_grad]
        grads, grad_sq = state["grads"], state["grad_sq"]
        for i in self._bar(range(state["next"], -1, -1), "loss gradients"):
            block = self.source.load_block(i)
            inputs = self.work.load(f"grad-in-{i}.pt")
            with LayerHooks(self._targets(i), self.device, inputs=False) as hooks:
                for k in range(len(spans)):
                    x = inputs[k].to(self.device).requires_grad_(True)
                    with torch.enable_grad():
                        out = self.runner.run(block, x, calls[k][i])
                        (gx,) = torch.autograd.grad(out, x, grads[k].to(out.device, out.dtype))
                    grads[k] = gx.detach().to("cpu")
            grad_sq.update({n: g.cpu() for n, g in hooks.grad_sq.items()})
            self.source.release_block(i)
            self.work.save("backward.pt", {"next": i - 1, "grads": grads, "grad_sq": grad_sq})
        if self.head is not None and self.head[2]:
            self._factorize_tied_table(calib, spans, grads)
        tokens = sum((b - a) * calib.shape[1] for a, b in spans)
        self.grad_sq = {n: g / tokens for n, g in grad_sq.items()}
        return self.grad_sq

    def _loss_head(self, calib, spans, last_hidden, n_grad: int) -> list[torch.Tensor]:
        """The loss gradients at the last block's output of the first ``n_grad`` batches. With the LM head a
        target, its statistics on *every* calibration batch (its input second moment and the model's next-token
        moments need no gradient: the forward suffices past ``n_grad``), then its factors or, tied, its kept
        statistics (:meth:`_factorize_head`)."""
        grads, moments = [], []
        hook = self.head and self.head[1].register_forward_hook(
            lambda m, args, logits: moments.append(predicted_token_moments(logits))
        )
        try:
            # the head's input statistics only: its output weights are the expected ones, from the logits
            with LayerHooks(dict([self.head[:2]] if self.head else []), self.device, grads=False) as hooks:
                for k, (a, b) in enumerate(spans[:n_grad]):
                    hooks.new_forward()
                    _, g = self.runner.head_grad(calib[a:b], last_hidden[k], self.config.seed + k)
                    grads.append(g)
                for k, (a, b) in enumerate(spans[n_grad:] if self.head else [], start=n_grad):
                    hooks.new_forward()
                    self.runner.head_forward(calib[a:b], last_hidden[k])
        finally:
            if hook:
                hook.remove()
        if self.head is not None:
            p_sum, pq_sum = (sum(m[j] for m in moments) for j in (0, 1))
            first = torch.cat([calib[a:b, 0] for a, b in spans])
            self._factorize_head(hooks, calib.shape[1], first, p_sum, pq_sum)
        return grads

    # -- pass C ------------------------------------------------------------------------------------------
    def _done(self, i: int) -> bool:
        """Whether pass C finished block ``i`` (an interrupted run resumes after it)."""
        return self.work.has(f"factors-{i}.pt")

    def _factorize_block(self, i: int | str, targets: dict[str, nn.Module], stats: CalibStats | None) -> None:
        cache, out, curves = {}, {}, {}
        for name, layer in targets.items():
            t0 = time.perf_counter()
            f = self.factorize(dense_weight(layer).detach(), stats, name, cache)
            cost = self.cost(layer, f, stats, name)
            keep = min(max(cost.max_rank, 1), f.rank)  # the largest rank the allocator can give
            out[name] = {
                "U": f.U[:, :keep].contiguous().cpu(),
                "S": f.S[:keep].cpu(),
                "Vh": f.Vh[:keep].contiguous().cpu(),
                "spectrum": f.spectrum.cpu(),
            }
            curves[name] = {
                "shape": list(cost.shape),
                "bias": cost.bias,
                "gains": cost.gains.cpu(),
                "seconds": time.perf_counter() - t0,
            }
        self.work.save(f"factors-{i}.pt", out)
        self.work.save(f"curves-{i}.pt", curves)

    def _factorize_head(self, hooks: LayerHooks, seq_len: int, first: torch.Tensor, p_sum, pq_sum) -> None:
        """An untied head's factors and curve (spill key ``head``) in the block layers' metric; a tied head's
        statistics, kept until the embedding's gradients are known (end of pass B). ``first``: the token ids at
        the rows' first positions; ``p_sum`` / ``pq_sum``: :func:`rankwise.calibrate.predicted_token_moments`
        summed over every calibration row.

        The head's output weights are the squared logit gradients in expectation over the model's own
        prediction, ``p (1 - p)``, not at the calibration text's next tokens: a sampled token prices only the
        few hundred rows the text contains, and the rest of the vocabulary (15% of the tokens of SmolLM2's
        evaluation text are absent from 8k calibration tokens) would be truncated for free. ``calibration_loss``
        averages a row's ``seq_len - 1`` scored positions, hence the scale. A tied table's token frequencies
        are likewise the model's predictions of each position's token (the token itself at a row's start).
        """
        name, layer, tied = self.head
        tokens = first.numel() * seq_len
        grad_sq = {name: pq_sum / ((seq_len - 1) ** 2 * tokens)}
        if tied:
            freq = (torch.bincount(first, minlength=p_sum.shape[0]).double() + p_sum) / tokens
            state = {"covariance": hooks.stats[name].covariance.cpu(), "grad_sq": grad_sq[name], "freq": freq}
            self.work.save("head-stats.pt", state)
            return
        self._factorize_block("head", {name: layer}, CalibStats(hooks.stats, grad_sq))

    def _factorize_tied_table(self, calib, spans, grads) -> None:
        """The tied table's factors and curve, priced as the head and as the input embedding (once: resumable)."""
        if self.work.has("curves-head.pt"):
            return
        t0 = time.perf_counter()
        (name, layer, embedding), head = self.head, self.work.load("head-stats.pt")
        emb = self.source.model.get_submodule(embedding)
        # the gradient at the embedding's output (not the stack's input: BERT normalizes in between), then at its
        # table's rows (Gemma scales them)
        g = torch.cat(
            [self.runner.embedding_grad(calib[a:b], emb, gk).flatten(0, -2) for (a, b), gk in zip(spans, grads)]
        )
        g = g.double() * embedding_scale(emb)
        W = dense_weight(layer).detach()
        f, gains = factorize_tied_table(W, head["covariance"], head["grad_sq"], head["freq"], g.T @ g / g.shape[0])
        parts = {"U": f.U, "S": f.S, "Vh": f.Vh, "spectrum": f.spectrum}
        self.work.save("factors-head.pt", {name: {k: v.contiguous().cpu() for k, v in parts.items()}})
        curve = {"shape": list(W.shape), "bias": 0, "gains": gains.cpu(), "seconds": time.perf_counter() - t0}
        self.work.save("curves-head.pt", {name: curve})

    def _factorize_all(self, given: CalibStats | None) -> list[LayerCurve]:
        for i in self._bar(range(self.source.num_blocks), "factorize blocks"):
            if self._done(i):
                continue
            self.source.load_block(i)
            self._factorize_block(i, self._targets(i), given)
            self.source.release_block(i)
        return self._curves()

    def _curves(self) -> list[LayerCurve]:
        curves = []
        for i, names in enumerate(self.groups):
            if not names:
                continue
            data = self.work.load(f"curves-{i}.pt")
            for name in names:
                d = data[name]
                curves.append(LayerCurve(name, i, LayerCost(tuple(d["shape"]), d["bias"], d["gains"]), d["seconds"]))
        if self.head is not None:
            d = self.work.load("curves-head.pt")[self.head[0]]
            gains = d["gains"] * self.config.head_weight
            curves.append(LayerCurve(self.head[0], -1, LayerCost(tuple(d["shape"]), d["bias"], gains), d["seconds"]))
        return curves

    def factors(self, i: int | str) -> dict[str, SVD]:
        """The spilled factors of block ``i`` or of the ``"head"`` (up to each layer's largest allocatable rank)."""
        if i != "head" and not self.groups[i]:
            return {}
        return {n: SVD(d["U"], d["S"], d["Vh"], d["spectrum"]) for n, d in self.work.load(f"factors-{i}.pt").items()}

    # -- pass D ------------------------------------------------------------------------------------------
    def sequential(self, calib: torch.Tensor, ranks: dict[str, int | None], emit) -> None:
        """Re-calibrate each block on the compressed blocks' outputs, refactorize at ``ranks``, ``emit(i, factors)``.

        ``emit(i, {name: truncated SVD or None})`` is called with block ``i`` still loaded; it must
        swap the layers in (the compressed block then computes the next block's inputs).
        """
        spans, hidden, calls = self.block_inputs(calib)
        for i in self._bar(range(self.source.num_blocks), "sequential blocks"):
            block = self.source.load_block(i)
            targets = self._targets(i)
            with torch.no_grad(), LayerHooks(targets, self.device) as hooks:
                for j in range(len(spans)):
                    hooks.new_forward()
                    self.runner.run(block, hidden[j], calls[j][i])
            stats, cache, new = CalibStats(hooks.stats, self.grad_sq), {}, {}
            for name, layer in targets.items():
                r = ranks[name]
                new[name] = (
                    None if r is None else self.factorize(dense_weight(layer).detach(), stats, name, cache).truncate(r)
                )
            emit(i, new)
            block = self.source.stack[i]
            with torch.no_grad():
                for j in range(len(spans)):
                    hidden[j] = self.runner.run(block, hidden[j], calls[j][i]).to("cpu")
            self.source.release_block(i)


def swap_in(model: nn.Module, factors: dict[str, SVD | None], dtype_of) -> dict[str, LowRankLinear]:
    """Replace each layer of ``factors`` (None: stays dense) by a ``LowRankLinear`` in ``dtype_of(name)``."""
    new = {}
    for name, f in factors.items():
        if f is None:
            continue
        layer = model.get_submodule(name)
        W = dense_weight(layer)
        new[name] = LowRankLinear.from_factors(f, getattr(layer, "bias", None), dtype=dtype_of(name)).to(W.device)
        replace_module(model, name, new[name])
    return new
