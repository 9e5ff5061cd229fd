"""Run a transformers model one block at a time.

Each block's call arguments, its forward on stored inputs, the loss head.

The model's own ``forward`` computes everything outside the block stack (embeddings, rotary tables,
attention masks, final norm, head): every block is replaced by a stand-in that records the arguments
the model passes it and returns its input unchanged, so no per-architecture code is needed and blocks
whose weights are not in memory (the meta device) are never touched. The same stand-ins inject a
stored last hidden state to compute the loss head. What a block is (its weights) comes from a
:class:`BlockSource`: the model in memory, or a checkpoint read one block at a time
(:mod:`rankwise.io.stream`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .calibrate import calibration_loss, is_causal_lm, model_inputs

Tensor = torch.Tensor


class BlockSource(Protocol):
    """Where block weights come from. ``model`` is complete outside the block stack."""

    model: nn.Module
    stack_name: str
    num_blocks: int

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its weights, on the compute device, parameters frozen."""

    def release_block(self, i: int) -> None:
        """Free what :meth:`load_block` materialized (nothing for a model in memory)."""


class InMemorySource:
    """Blocks of a model already in memory: loading moves a block to ``device``, releasing moves it back."""

    def __init__(self, model: nn.Module, stack_name: str, device: torch.device):
        self.model, self.stack_name, self.device = model, stack_name, torch.device(device)
        self.stack = model.get_submodule(stack_name)
        self.num_blocks = len(self.stack)
        self._home = [next(b.parameters()).device for b in self.stack]

    def load_block(self, i: int) -> nn.Module:
        return self.stack[i].to(self.device)

    def release_block(self, i: int) -> None:
        self.stack[i].to(self._home[i])


class _Stop(Exception):
    """Raised by the last stand-in: the forward has recorded everything it is needed for."""


class _StandIn(nn.Module):
    """Takes a block's place in the stack for one forward: records its call, returns a chosen output.

    Attribute reads it does not have fall through to the real block (models read e.g.
    ``decoder_layer.attention_type`` to pick a mask), which may be on the meta device.
    """

    def __init__(self, block: nn.Module, index: int, runner: BlockRunner):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a child: the stack's parameters stay the real ones
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        return self._runner._visit(self._index, args, kwargs)


class BlockRunner:
    """Calls the blocks of ``source`` one at a time on stored hidden states.

    ``calls(batch)`` returns, for a batch of token ids, the block stack's input and the keyword
    arguments the model passes every block (kept per batch shape: they depend on the shape, not the
    tokens); ``run(block, i, hidden, calls)`` runs block ``i``; ``head_grad`` gives the loss and its
    gradient with respect to the last block's output.
    """

    def __init__(self, source: BlockSource, device: torch.device, dtype: torch.dtype):
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.model = source.model
        self.stack = self.model.get_submodule(source.stack_name)
        self._mode: str | None = None
        self._record: dict[str, Any] = {}
        self._calls: dict[tuple[int, ...], list[tuple[tuple, dict]]] = {}
        self._tuple_out: bool | None = None

    # -- the stand-in protocol -------------------------------------------------------------------
    def _visit(self, i: int, args: tuple, kwargs: dict):
        hidden, rest, kw = _split_hidden(args, kwargs)
        if self._mode == "record":
            self._record.setdefault("calls", []).append((rest, kw))
            if i == 0:
                self._record["hidden"] = hidden
            if i == self.source.num_blocks - 1 or self._tuple_out is None:
                raise _Stop
        elif self._mode == "inject" and i == 0:
            hidden = self._record["inject"]
        return (hidden,) if self._tuple_out else hidden

    def _forward_with_stand_ins(self, batch: Tensor, mode: str, inject: Tensor | None = None):
        originals = list(self.stack)
        for i, block in enumerate(originals):
            self.stack[i] = _StandIn(block, i, self)
        self._mode, self._record = mode, ({"inject": inject} if inject is not None else {})
        try:
            return self.model(**model_inputs(batch.to(self.device)), use_cache=False)
        except _Stop:
            return None
        finally:
            for i, block in enumerate(originals):
                self.stack[i] = block
            self._mode = None

    # -- public API --------------------------------------------------------------------------------
    def calls(self, batch: Tensor) -> tuple[Tensor, list[tuple[tuple, dict]]]:
        """``(hidden, calls)``: the block stack's input for ``batch``, shape (b, seq_len, hidden), on the
        CPU in the compute dtype, and ``calls[i] = (extra positional args, kwargs)`` of block ``i``."""
        with torch.no_grad():
            if self._tuple_out is None:
                self._probe_output_type(batch)
            self._forward_with_stand_ins(batch, "record")
        hidden = self._record["hidden"].detach().to("cpu", self.dtype)
        key = tuple(batch.shape)
        if key not in self._calls:
            self._calls[key] = self._record["calls"]
        return hidden, self._calls[key]

    def run(self, block: nn.Module, hidden: Tensor, call: tuple[tuple, dict]) -> Tensor:
        """Block output for ``hidden`` (moved to the compute device); gradients flow if enabled."""
        rest, kw = call
        out = block(hidden.to(self.device, self.dtype), *rest, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    def head_grad(self, batch: Tensor, last: Tensor, seed: int) -> tuple[float, Tensor]:
        """``(loss, dL/d last)`` for the calibration loss of ``batch`` given the last block's output ``last``.

        Causal LMs score one sequence at a time (the logits of a whole batch can be larger than the
        model); the summed per-sequence losses are those of :func:`rankwise.calibrate.collect_stats`.
        """
        grads, total = [], 0.0
        for a, b in self._pieces(batch):
            h = last[a:b].to(self.device, self.dtype).requires_grad_(True)
            with torch.enable_grad():
                out = self._forward_with_stand_ins(batch[a:b], "inject", inject=h)
                loss = calibration_loss(self.model, batch[a:b].to(self.device), out, seed) * (b - a)
                (g,) = torch.autograd.grad(loss, h)
            grads.append(g.detach().to("cpu"))
            total += float(loss.detach())
        return total / batch.shape[0], torch.cat(grads)

    def head_forward(self, batch: Tensor, last: Tensor) -> None:
        """The model's forward after the block stack (final norm, head) on ``last``, without gradients: for the
        hooks of a caller that measures the head."""
        with torch.no_grad():
            for a, b in self._pieces(batch):
                self._forward_with_stand_ins(batch[a:b], "inject", inject=last[a:b].to(self.device, self.dtype))

    def _pieces(self, batch: Tensor) -> list[tuple[int, int]]:
        """Rows run together after the stack: one at a time for a causal LM (a batch's logits can outgrow the
        model), all at once otherwise."""
        n = batch.shape[0]
        return [(j, j + 1) for j in range(n)] if is_causal_lm(self.model) else [(0, n)]

    def embedding_grad(self, batch: Tensor, embedding: nn.Module, grad: Tensor) -> Tensor:
        """The loss gradient at ``embedding``'s output given ``grad``, the one at the block stack's input.

        Backpropagates through what the model computes between the two (Gemma scales the embedding by
        ``sqrt(hidden)``; Llama passes it unchanged), recording the stack's input with autograd on.
        """
        out = []

        def leaf(module, args, y):  # the embedding's output, as a leaf the gradient is taken at
            out.append(y.detach().requires_grad_(True))
            return out[-1]

        hook = embedding.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                self._forward_with_stand_ins(batch, "record")
                (g,) = torch.autograd.grad(self._record["hidden"], out[0], grad.to(out[0].device, out[0].dtype))
        finally:
            hook.remove()
        return g.detach().to("cpu")

    def _probe_output_type(self, batch: Tensor) -> None:
        """Whether blocks return a tuple (older transformers) or a tensor: run the real block 0 once."""
        self._tuple_out = None
        self._forward_with_stand_ins(batch[:1], "record")  # stops at block 0 whatever the output type
        hidden, (rest, kw) = self._record["hidden"], self._record["calls"][0]
        block = self.source.load_block(0)
        try:
            out = block(hidden, *rest, **kw)
        finally:
            self.source.release_block(0)
        self._tuple_out = isinstance(out, (tuple, list))


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """The hidden-state argument of a block call (first positional, or ``hidden_states=``) and the rest."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kw = dict(kwargs)
    if "hidden_states" not in kw:
        raise ValueError(f"cannot find the hidden states in a block call with keyword arguments {sorted(kw)}")
    return kw.pop("hidden_states"), (), kw
