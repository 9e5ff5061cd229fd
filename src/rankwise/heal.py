"""heal_(student, teacher, ids, config): distil a compressed model towards its dense original (a recovery fine-tune).

Only the factorized layers' parameters train (``LowRankLinear`` factors and bias, and every parameter of
the other factorized layer types; ``train_norms`` adds the normalization layers); everything else is
frozen. The loss is the mean over predicted positions of KL(teacher || student) between the next-token
distributions at temperature 1, on the whole vocabulary (teacher run on the fly) or on the teacher's
top-k tokens plus one bucket for the rest of its mass (teacher run once before training and its top-k
cached, so that the caller can free it before the student trains, as
:func:`rankwise.heal_checkpoint.heal_checkpoint` does). On tiny Llamas the whole vocabulary healed slightly
better, so it is the default. AdamW, linear warm-up then cosine decay to zero, gradient-norm clipping; the
data order is a seeded permutation per epoch, so the same
inputs and seed give bit-identical factors.

Where a model's logits are its output layer applied to its base model's last hidden state (Llama, GPT-2 and
most causal LMs; checked once, :func:`split_head`), the output layers and the KL divergence run
:data:`KL_CHUNK` positions at a time and are backpropagated chunk by chunk (:func:`backward_in_chunks`), so no
(tokens, vocabulary) tensor is ever whole: SmolLM2 at 512 tokens, peak memory 3.58 -> 2.91 GB, CPU time per
step unchanged within the noise (BENCHMARKS.md); other models use the whole logits.

``orthogonal=True`` trains every ``LowRankLinear`` as ``U diag(s) Vh`` with ``U`` and ``Vh`` kept
orthonormal by Riemannian steps (gradients projected onto the tangent space, a QR retraction after each
optimizer step) and ``s`` free, folded back into ``up``/``down`` afterwards (:mod:`rankwise.heal_orthogonal`).

References
----------
G. Hinton, O. Vinyals and J. Dean, "Distilling the knowledge in a neural network", arXiv:1503.02531, 2015.
X. Wang, Y. Zheng, Z. Wan and M. Zhang, "SVD-LLM: Truncation-aware singular value decomposition for large
language model compression", ICLR 2025, arXiv:2403.07378 (the recovery fine-tune of the low-rank factors
after truncation, there with LoRA on the factors).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import is_int, is_number
from .calibrate import _bar
from .heal_orthogonal import OrthonormalLowRank, orthonormal_factors, retract_
from .layers.linear import LowRankLinear


@dataclass(frozen=True)
class HealConfig:
    """How to heal; frozen and JSON-serializable (``asdict``).

    steps : optimizer steps; ``None`` = one pass over the healing sequences (``n_seqs // batch_size``),
        more steps cycle through them again in a new seeded order.
    batch_size : sequences per step.
    lr : peak AdamW learning rate, reached after ``warmup`` (a fraction of the steps), then cosine decay to 0.
    weight_decay, max_grad_norm : AdamW's decoupled weight decay; the clipping threshold of the gradient norm.
    train_norms : also train the normalization layers (weights and biases of every module named ``*Norm*``).
    orthogonal : keep each LowRankLinear's factors orthonormal (singular values free) while training, by
        Riemannian steps (:mod:`rankwise.heal_orthogonal`). Off by default: on SmolLM2 at keep 0.6 (32 steps of
        512 tokens, learning rate chosen on held-out healing text) it closed less of the perplexity gap than free
        factors, at 1.3-1.4x their CPU time per step; on tiny Llamas the two heal equally at their best learning
        rates (BENCHMARKS.md).
    top_k : 0 = KL on the whole vocabulary with the teacher run on the fly; k > 0 = KL on the teacher's k most
        likely tokens plus one bucket for the rest, cached before training.
    checkpointing : gradient checkpointing of the student's blocks (transformers models that support it): each
        block's activations are recomputed in the backward pass instead of kept (SmolLM2, 512 tokens: measured
        +4% step time on a loaded machine).
    autocast : run the student's and the teacher's transformer bodies under bfloat16 autocast (CPU or CUDA);
        the output layers, the KL divergence, the parameters, their gradients and AdamW's state stay float32
        (models whose output layer cannot be split from the body run whole under autocast).
    """

    steps: int | None = None
    batch_size: int = 1
    lr: float = 1e-4  # SmolLM2 keep 0.6, 128 x 512 tokens: beat 2e-4 on held-out healing text (BENCHMARKS.md)
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_norms: bool = False
    orthogonal: bool = False
    top_k: int = 0
    checkpointing: bool = True
    autocast: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "top_k", "seed"):
            value, low = getattr(self, name), 0 if name in ("top_k", "seed") else 1
            if name == "steps" and value is None:
                continue
            if not is_int(value) or value < low:
                accepted = f"an int >= {low}" + (" or None" if name == "steps" else "")
                raise ValueError(f"{name} must be {accepted}, got {value!r}")
        for name in ("lr", "warmup", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            what = {"lr": "in (0, 1]", "max_grad_norm": "> 0"}.get(name, "in [0, 1]")
            ok = is_number(value)
            ok = ok and (value > 0 if name == "max_grad_norm" else 0 <= value <= 1 and (name != "lr" or value > 0))
            if not ok:
                raise ValueError(f"{name} must be a number {what}, got {value!r}")


@dataclass
class HealReport:
    """What a heal did: its config, the loss of every step, tokens read, wall time (seconds)."""

    config: HealConfig
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    trained_params: int = 0
    seconds: float = 0.0
    quantization: dict | None = None  # what quantizing the healed model stored (heal_checkpoint's ``quant``)

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "losses": list(self.losses),
            "tokens": self.tokens,
            "trained_params": self.trained_params,
            "seconds": self.seconds,
            "quantization": self.quantization,
        }

    def summary(self) -> str:
        k = max(1, len(self.losses) // 10)
        first, last = (sum(x) / len(x) for x in (self.losses[:k], self.losses[-k:]))
        return (
            f"healed {len(self.losses)} steps on {self.tokens:,} tokens "
            f"({self.trained_params:,} parameters trained) in {self.seconds:.1f} s; "
            f"KL to the teacher {first:.4f} -> {last:.4f} nats/token "
            f"(mean of the first and last {k} steps)"
        ) + ("\n" + self.quantization["summary"] if self.quantization else "")


# Positions per chunk of the output layer and the KL divergence: (KL_CHUNK, vocab) float32 tensors instead of
# (tokens, vocab) ones (SmolLM2, 512 tokens: 100 MB each, several per step).
KL_CHUNK = 128


def is_factorized(module: nn.Module) -> bool:
    """A LowRankLinear (or its orthonormal training form) or another factorized layer type (with a ``spec()``)."""
    return isinstance(module, (LowRankLinear, OrthonormalLowRank)) or callable(getattr(module, "spec", None))


def trainable_parameters(model: nn.Module, train_norms: bool = False) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of every factorized layer (and, with ``train_norms``, every norm layer)."""
    chosen: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if is_factorized(module) or (train_norms and "norm" in type(module).__name__.lower()):
            chosen.update(
                {f"{name}.{p}": param for p, param in module.named_parameters() if f"{name}.{p}" not in chosen}
            )
    if not chosen:
        raise ValueError("the model has no factorized layer to heal (no LowRankLinear or other factorized layer)")
    return chosen


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) on the whole vocabulary, mean (or ``reduction="sum"``) over positions; logits shape
    (..., vocab)."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean" if reduction == "mean" else reduction)


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logp)))`` over the last axis, finite when the k tokens hold (almost) all the mass."""
    return torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))


def kl_top_k(
    student_logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean (or ``reduction="sum"``) over positions of the KL divergence between the teacher's and the student's
    distributions over k + 1 outcomes: the teacher's k most likely tokens (``top_logp``, ``top_idx``: shape
    (..., k)) and the rest.

    A lower bound of the full-vocabulary KL (merging outcomes never increases a KL divergence), equal to it
    when the rest holds no mass.
    """
    s_all = F.log_softmax(student_logits.float(), dim=-1)
    s = s_all.gather(-1, top_idx.long())
    t = top_logp.float()
    kl = (t.exp() * (t - s)).sum(-1)
    t_rest, s_rest = _log_rest(t), _log_rest(s)
    kl = kl + t_rest.exp() * (t_rest - s_rest)
    return kl.sum() if reduction == "sum" else kl.mean()


def split_head(model: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` when ``model``'s logits are ``head(body(ids).last_hidden_state)`` (checked on ``ids``, shape
    (1, seq_len)): the output layer can then run a chunk of positions at a time. ``None`` otherwise (a model that
    scales or caps its logits after the output layer, or has no separate base model)."""
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is model or head is None:
        return None
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = head(body(input_ids=ids, use_cache=False).last_hidden_state)
    return (body, head) if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-5) else None


def backward_in_chunks(hidden: torch.Tensor, head: nn.Module, loss_sum, chunk: int = KL_CHUNK) -> torch.Tensor:
    """Backpropagate the mean over positions of a loss of ``head(hidden)`` through ``head`` and ``hidden`` (shape
    (..., hidden_size)), ``chunk`` positions at a time, so that no (positions, vocab) tensor is ever whole.

    ``loss_sum(logits, rows)``: the loss summed over the flattened positions ``rows`` (a slice), from their
    logits, shape (rows, vocab). Returns the mean loss, detached. The gradients are those of the whole loss.
    """
    flat = hidden.detach().float().flatten(0, -2).requires_grad_()  # float32 output layer under bf16 bodies too
    n = flat.shape[0]
    total = torch.zeros((), device=hidden.device)
    for i in range(0, n, chunk):
        rows = slice(i, min(i + chunk, n))
        loss = loss_sum(head(flat[rows]), rows) / n
        loss.backward()
        total += loss.detach()
    hidden.backward(flat.grad.view(hidden.shape).to(hidden.dtype))
    return total


def teacher_top_k(
    teacher: nn.Module, ids: torch.Tensor, k: int, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` next-token log-probabilities and token ids at every position of ``ids``.

    Returns ``(log-probs float32, ids int64)``, each of shape (n_seqs, seq_len, k).
    """
    device = next(teacher.parameters()).device
    values, indices = [], []
    with torch.inference_mode():
        for row in _bar(ids, progress, "teacher top-k"):
            logp = F.log_softmax(teacher(input_ids=row[None].to(device)).logits[0].float(), dim=-1)
            v, i = logp.topk(k, dim=-1)
            values.append(v.cpu())
            indices.append(i.cpu())
    return torch.stack(values), torch.stack(indices)


def data_order(n_seqs: int, count: int, seed: int) -> torch.Tensor:
    """``count`` sequence indices: concatenated seeded permutations of ``range(n_seqs)``, one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-count // n_seqs)
    return torch.cat([torch.randperm(n_seqs, generator=gen) for _ in range(epochs)])[:count]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``ceil(warmup * steps)`` steps, then cosine decay to 0 at ``steps``."""
    w = math.ceil(warmup * steps)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(steps - w, 1)))


def _check_ids(ids, batch_size: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.shape[1] < 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"healing token ids must be an integer tensor of shape (n_seqs, seq_len >= 2), got {shape}")
    if ids.shape[0] < batch_size:
        raise ValueError(f"healing needs at least batch_size={batch_size} sequences, got {ids.shape[0]}")


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _loss_of_logits(student, teacher, batch, top, rows, autocast: bool) -> torch.Tensor:
    """The distillation loss from the whole logits (models whose output layer cannot run by chunks)."""
    with _autocast(batch.device, autocast):
        logits = student(input_ids=batch, use_cache=False).logits
    if top is not None:
        return kl_top_k(logits, top[0][rows].to(batch.device), top[1][rows].to(batch.device))
    t_device = next(teacher.parameters()).device
    with torch.no_grad(), _autocast(t_device, autocast):
        target = teacher(input_ids=batch.to(t_device)).logits.to(batch.device)
    return kl_full(logits, target)


def _backward_by_chunks(parts, batch, top, rows, autocast: bool) -> torch.Tensor:
    """The distillation loss with the output layers run :data:`KL_CHUNK` positions at a time (and its backward)."""
    with _autocast(batch.device, autocast):
        hidden = parts[0](input_ids=batch, use_cache=False).last_hidden_state
    if top is None:
        teacher_body, teacher_head = parts[2:]
        t_device = next(teacher_body.parameters()).device
        with torch.no_grad(), _autocast(t_device, autocast):
            t_hidden = teacher_body(input_ids=batch.to(t_device), use_cache=False).last_hidden_state.flatten(0, -2)
        t_hidden = t_hidden.float()

        def loss_sum(logits, chunk):
            with torch.no_grad():
                target = teacher_head(t_hidden[chunk]).to(logits.device)
            return kl_full(logits, target, reduction="sum")
    else:
        values, indices = (t[rows].flatten(0, -2).to(batch.device) for t in top)

        def loss_sum(logits, chunk):
            return kl_top_k(logits, values[chunk], indices[chunk], reduction="sum")

    return backward_in_chunks(hidden, parts[1], loss_sum)


def heal_(
    student: nn.Module,
    teacher: nn.Module | None,
    ids: torch.Tensor,
    config: HealConfig | None = None,
    *,
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> HealReport:
    """Distil ``student`` (a compressed model, changed in place) towards ``teacher`` on the sequences ``ids``.

    Parameters
    ----------
    student : causal LM with factorized layers, returning ``.logits`` (batch, seq_len, vocab). Trained in
        float32 whatever its dtype, cast back afterwards; in train mode while healing (dropout as its config
        sets it: SmolLM2 and other Llamas have none), left in eval mode.
    teacher : the dense model, same vocabulary; not modified. With ``config.top_k`` it is only read before
        training (:func:`teacher_top_k`), and may be ``None`` when ``cached`` holds what it gives: the
        caller can then free the teacher before the student trains.
    ids : LongTensor, shape (n_seqs, seq_len): the healing text (disjoint from any evaluation text).
    config : :class:`HealConfig` (default ``HealConfig()``).
    cached : ``teacher_top_k(teacher, ids, config.top_k)``, computed beforehand (``config.top_k`` only).

    Returns
    -------
    HealReport with the loss of every step.
    """
    config = HealConfig() if config is None else config
    if not isinstance(config, HealConfig):
        raise ValueError(f"config must be a rankwise.heal.HealConfig, got {type(config).__name__}")
    _check_ids(ids, config.batch_size)
    if cached is not None and not config.top_k:
        raise ValueError("cached top-k teacher log-probabilities are given but config.top_k is 0 (full-vocabulary KL)")
    if teacher is None and cached is None:
        raise ValueError("heal_ needs the dense teacher model (or, with config.top_k, its cached top-k)")
    if teacher is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"student and teacher vocabularies differ: {student.config.vocab_size} vs {teacher.config.vocab_size}"
        )
    t0 = time.perf_counter()
    steps = config.steps or ids.shape[0] // config.batch_size
    top = cached
    if top is None and config.top_k:
        top = teacher_top_k(teacher, ids, config.top_k, progress=progress)
    if top is not None and tuple(top[0].shape) != (*ids.shape, config.top_k):
        raise ValueError(f"cached top-k must have shape {(*ids.shape, config.top_k)}, got {tuple(top[0].shape)}")
    dtype = next(student.parameters()).dtype
    nn.Module.float(student)  # transformers' own float()/to() refuse dtype casts of (rankwise-)quantized models
    torch.manual_seed(config.seed)
    for p in student.parameters():
        p.requires_grad_(False)
    report = HealReport(config)
    device = next(student.parameters()).device
    checkpointing = config.checkpointing and getattr(student, "supports_gradient_checkpointing", False)
    try:
        with orthonormal_factors(student, config.orthogonal):
            params = list(trainable_parameters(student, config.train_norms).values())
            for p in params:
                p.requires_grad_(True)
            report.trained_params = sum(p.numel() for p in params)
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, config.warmup))
            if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in 6)
                enable = getattr(student, "activation_checkpointing_enable", None)
                (enable or student.gradient_checkpointing_enable)()
            sample = ids[:1, :16].to(device)
            parts = split_head(student, sample)
            if top is None and parts is not None:
                teacher_parts = split_head(teacher, sample.to(next(teacher.parameters()).device))
                parts = None if teacher_parts is None else parts + teacher_parts
            student.train()
            order = data_order(ids.shape[0], steps * config.batch_size, config.seed).view(steps, config.batch_size)
            bar = _bar(order, progress, "heal")
            for rows in bar:
                batch = ids[rows].to(device)
                opt.zero_grad(set_to_none=True)
                if parts is None:
                    loss = _loss_of_logits(student, teacher, batch, top, rows, config.autocast)
                    loss.backward()
                else:
                    loss = _backward_by_chunks(parts, batch, top, rows, config.autocast)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                if config.orthogonal:
                    retract_(student)
                sched.step()
                report.losses.append(float(loss.detach()))
                report.tokens += batch.numel()
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{report.losses[-1]:.4g}")
    finally:
        if checkpointing:
            disable = getattr(student, "activation_checkpointing_disable", None)
            (disable or student.gradient_checkpointing_disable)()
        for p in student.parameters():
            p.requires_grad_(False)
        nn.Module.to(student, dtype).eval()
    report.seconds = time.perf_counter() - t0
    return report
