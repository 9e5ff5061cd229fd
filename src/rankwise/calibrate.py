"""Streamed calibration statistics: per-input X^T X and mean |x|, per-output Fisher diagonal, via hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .formats._ops import gram

Tensor = torch.Tensor


@dataclass
class InputStats:
    """Running statistics of the inputs ``x`` (rows of ``X``, shape (tokens, n)) of one or more layers.

    gram : Tensor, shape (n, n), float64, ``X^T X``; abs_sum : Tensor, shape (n,), float64, ``sum |x|``;
    count : number of token rows seen. Layers reading the same tensor (q/k/v, gate/up) share one object.
    """

    gram: Tensor
    abs_sum: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> InputStats:
        return cls(
            torch.zeros(n, n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device)
        )

    def add(self, x: Tensor) -> None:
        """Accumulate a batch ``x`` of shape (..., n): float32 products per batch (BLAS syrk on one CPU thread),
        float64 running sums."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += gram(rows.T, torch.float32)
        self.abs_sum += rows.abs().sum(0).double()
        self.count += rows.shape[0]

    @property
    def mean_abs(self) -> Tensor:
        """shape (n,): mean |x| per input channel (ASVD's activation scale)."""
        return self.abs_sum / max(self.count, 1)

    @property
    def covariance(self) -> Tensor:
        """shape (n, n): ``X^T X / count`` (uncentred second moment)."""
        return self.gram / max(self.count, 1)


@dataclass
class CalibStats:
    """inputs : name -> :class:`InputStats` (shared objects for shared inputs);
    out_grad_sq : name -> Tensor shape (m,), float64, mean over tokens of the squared loss gradient
    w.r.t. the layer's output (empty unless requested); loss : mean calibration loss (or None)."""

    inputs: dict[str, InputStats]
    out_grad_sq: dict[str, Tensor] = field(default_factory=dict)
    loss: float | None = None

    def groups(self) -> list[list[str]]:
        """Names grouped by the input they share, in module order."""
        seen: dict[int, list[str]] = {}
        for name, st in self.inputs.items():
            seen.setdefault(id(st), []).append(name)
        return list(seen.values())


def model_inputs(batch: Tensor) -> dict[str, Tensor]:
    """Keyword inputs for one forward: token ids and an all-ones attention mask (decoders and encoders)."""
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (a transformers ``*ForCausalLM`` or a decoder config)."""
    return "CausalLM" in type(model).__name__ or bool(getattr(getattr(model, "config", None), "is_decoder", False))


def predicted_token_moments(logits: Tensor, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """``(sum_t p_t, sum_t p_t (1 - p_t))`` over the positions the causal calibration loss scores.

    ``p_t = softmax(logits[:, t])`` for every position but the last of each row; float64, shape (vocab,).
    ``p_t(v)`` is the expectation of the indicator that token ``v`` comes next, and ``p_t(v)(1 - p_t(v))`` that
    of the squared cross-entropy gradient ``(p_t(v) - [y = v])^2`` for ``y ~ p_t`` (the diagonal of the
    Gauss-Newton matrix of the logits): every vocabulary entry gets a weight, not only those the calibration
    text happens to contain.
    """
    scored = logits[:, :-1].reshape(-1, logits.shape[-1])
    p_sum = torch.zeros(logits.shape[-1], dtype=torch.float64, device=logits.device)
    pq_sum = torch.zeros_like(p_sum)
    for i in range(0, scored.shape[0], chunk):
        p = torch.softmax(scored[i : i + chunk].detach().float(), dim=-1)
        p_sum += p.sum(0, dtype=torch.float64)
        pq_sum += (p * (1 - p)).sum(0, dtype=torch.float64)
    return p_sum.cpu(), pq_sum.cpu()


def calibration_loss(model: nn.Module, batch: Tensor, output, seed: int) -> Tensor:
    """The scalar whose gradient defines the Fisher weights.

    Causal LMs: next-token cross-entropy on the calibration text (empirical Fisher). Other models
    (encoders): ``<z, h>`` for a seeded Gaussian ``z`` over the last hidden state ``h``, so that the
    expected squared output gradient is that of the squared error of ``h`` (Gauss-Newton).
    """
    logits = getattr(output, "logits", None)
    if is_causal_lm(model) and logits is not None:
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1).to(logits.device)
        )
    hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output.logits if logits is not None else output
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(hidden.shape, generator=gen, dtype=torch.float32).to(hidden.device)
    return (hidden.float() * z).sum() / hidden.shape[0]


class LayerHooks:
    """Forward hooks on ``targets`` that stream :class:`InputStats` (``inputs``) and, when gradients flow, the
    squared output gradients (``grads``) of each layer, in a ``with`` block.

    A layer whose input is the very tensor object the previous target read (q/k/v, gate/up) shares that
    layer's :class:`InputStats`; call :meth:`new_forward` before each forward so that sharing is only
    detected within one forward. Used on a whole model and on one block at a time alike.
    """

    def __init__(self, targets: dict[str, nn.Module], device: torch.device, *, inputs: bool = True, grads: bool = True):
        self.targets, self.device, self.inputs, self.grads = targets, device, inputs, grads
        self.stats: dict[str, InputStats] = {}
        self.grad_sq: dict[str, Tensor] = {}
        self._followers: set[str] = set()
        self._last = self._leader = None
        self._handles = []

    def new_forward(self) -> None:
        self._last = self._leader = None

    def _pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.stats:
                if self._last is not None and x is self._last:
                    self.stats[name] = self.stats[self._leader]
                    self._followers.add(name)
                    return
                self.stats[name] = InputStats.zeros(x.shape[-1], self.device)
            elif name in self._followers:
                return
            self.stats[name].add(x)
            self._last, self._leader = x, name

        return hook

    def _fwd_hook(self, name: str):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: _add_grad(self.grad_sq, name, g))

        return hook

    def __enter__(self) -> LayerHooks:
        for name, m in self.targets.items():
            if self.inputs:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name)))
            if self.grads:
                self._handles.append(m.register_forward_hook(self._fwd_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = self._leader = None


def collect_stats(
    model: nn.Module,
    targets: dict[str, nn.Module],
    calib: Tensor,
    *,
    batch_size: int = 4,
    fisher_seqs: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> CalibStats:
    """Run ``calib`` through the whole ``model`` at once and stream the statistics of every target layer.

    The reference for :mod:`rankwise.pipeline`, which computes the same statistics one block at a time
    in bounded memory; use this one when the model and every statistic fit in memory (it holds one
    (n, n) matrix per distinct input of the whole model).

    For the first ``fisher_seqs`` sequences (batches end at that boundary) the forward also runs with
    autograd and a backward pass of :func:`calibration_loss` times the batch's sequence count (the sum
    of per-sequence losses, so a token's gradient does not depend on the batch size) fills
    ``out_grad_sq`` (only activation gradients are computed).

    Parameters
    ----------
    calib : LongTensor, shape (n_seqs, seq_len), token ids.
    """
    device = next(model.parameters()).device

    def embed_hook(module, args, out):
        return out.requires_grad_(True) if torch.is_grad_enabled() else out

    handles = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if fisher_seqs and embed is not None:
        handles.append(embed.register_forward_hook(embed_hook))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    losses, grad_tokens = [], 0
    try:
        with LayerHooks(targets, device) as hooks:
            for p in model.parameters():
                p.requires_grad_(False)
            for i, (start, stop) in enumerate(
                _bar(batch_spans(calib.shape[0], fisher_seqs, batch_size), progress, "calibration")
            ):
                batch = calib[start:stop].to(device)
                hooks.new_forward()
                with_grad = start < fisher_seqs
                with torch.set_grad_enabled(with_grad):
                    out = model(**model_inputs(batch))
                    if with_grad:
                        loss = calibration_loss(model, batch, out, seed + i)
                        (loss * batch.shape[0]).backward()
                        losses.append(float(loss.detach()))
                        grad_tokens += batch.numel()
                del out
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    missing = [n for n in targets if n not in hooks.stats]
    if missing:
        raise ValueError(
            f"calibration never reached layer(s) {', '.join(missing[:3])}: they are not used by the model's forward"
        )
    out_grad = {n: g / grad_tokens for n, g in hooks.grad_sq.items()}
    return CalibStats({n: hooks.stats[n] for n in targets}, out_grad, sum(losses) / len(losses) if losses else None)


def batch_spans(n: int, fisher_seqs: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each calibration batch: batches of ``batch_size`` that end at ``fisher_seqs``."""
    split = min(fisher_seqs, n)
    spans = [(a, min(a + batch_size, split)) for a in range(0, split, batch_size)]
    return spans + [(a, min(a + batch_size, n)) for a in range(split, n, batch_size)]


def _add_grad(acc: dict[str, Tensor], name: str, g: Tensor) -> None:
    sq = g.detach().float().reshape(-1, g.shape[-1]).pow(2).sum(0).double()
    if name in acc:
        acc[name] += sq
    else:
        acc[name] = sq


def _bar(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
