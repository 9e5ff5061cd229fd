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
    def zeros(cls, n: int, device: torch.device) -> "InputStats":
        return cls(torch.zeros(n, n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device))

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


def calibration_loss(model: nn.Module, batch: Tensor, output, seed: int) -> Tensor:
    """The scalar whose gradient defines the Fisher weights.

    Causal LMs: next-token cross-entropy on the calibration text (empirical Fisher). Other models
    (encoders): ``<z, h>`` for a seeded Gaussian ``z`` over the last hidden state ``h``, so that the
    expected squared output gradient is that of the squared error of ``h`` (Gauss-Newton).
    """
    logits = getattr(output, "logits", None)
    causal = "CausalLM" in type(model).__name__ or bool(getattr(getattr(model, "config", None), "is_decoder", False))
    if causal and logits is not None:
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1).to(logits.device)
        )
    hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output.logits if logits is not None else output
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(hidden.shape, generator=gen, dtype=torch.float32).to(hidden.device)
    return (hidden.float() * z).sum() / hidden.shape[0]


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
    """Run ``calib`` through ``model`` and stream the statistics of every target layer.

    Input statistics are computed once per distinct input tensor: a layer whose input is the very
    tensor object the previous target read (q/k/v, gate/up) shares that layer's :class:`InputStats`.
    Activations are never stored; memory is one (n, n) matrix per distinct input.

    For the first ``fisher_seqs`` sequences (batches end at that boundary) the forward also runs with
    autograd and a backward pass of :func:`calibration_loss` times the batch's sequence count (the sum
    of per-sequence losses, so a token's gradient does not depend on the batch size) fills
    ``out_grad_sq`` (only activation gradients are computed).

    Parameters
    ----------
    calib : LongTensor, shape (n_seqs, seq_len), token ids.
    """
    device = next(model.parameters()).device
    state = {"last": None, "leader": None}
    stats: dict[str, InputStats] = {}
    followers: set[str] = set()
    grad_sq: dict[str, Tensor] = {}
    grad_tokens = {"n": 0}

    def pre_hook(name):
        def hook(module, args):
            x = args[0]
            if name not in stats:
                if state["last"] is not None and x is state["last"]:
                    stats[name] = stats[state["leader"]]
                    followers.add(name)
                    return
                stats[name] = InputStats.zeros(x.shape[-1], device)
            elif name in followers:
                return
            stats[name].add(x)
            state["last"], state["leader"] = x, name

        return hook

    def fwd_hook(name):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: _add_grad(grad_sq, name, g))

        return hook

    def embed_hook(module, args, out):
        return out.requires_grad_(True) if torch.is_grad_enabled() else out

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in targets.items()]
    handles += [m.register_forward_hook(fwd_hook(n)) for n, m in targets.items()]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if fisher_seqs and embed is not None:
        handles.append(embed.register_forward_hook(embed_hook))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        n, split = calib.shape[0], min(fisher_seqs, calib.shape[0])
        spans = [(a, min(a + batch_size, split)) for a in range(0, split, batch_size)]
        spans += [(a, min(a + batch_size, n)) for a in range(split, n, batch_size)]
        for i, (start, stop) in enumerate(_bar(spans, progress, "calibration")):
            batch = calib[start:stop].to(device)
            state["last"] = state["leader"] = None
            with_grad = start < fisher_seqs
            with torch.set_grad_enabled(with_grad):
                out = model(**model_inputs(batch))
                if with_grad:
                    loss = calibration_loss(model, batch, out, seed + i)
                    (loss * batch.shape[0]).backward()
                    losses.append(float(loss.detach()))
                    grad_tokens["n"] += batch.numel()
            state["last"] = None
            del out
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    missing = [n for n in targets if n not in stats]
    if missing:
        raise ValueError(f"calibration never reached layer(s) {', '.join(missing[:3])}: they are not used by the model's forward")
    out_grad = {n: g / grad_tokens["n"] for n, g in grad_sq.items()}
    return CalibStats({n: stats[n] for n in targets}, out_grad, sum(losses) / len(losses) if losses else None)


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
