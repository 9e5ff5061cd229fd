"""Built-in text (no download) and its cutting into token sequences for calibration and evaluation."""

from __future__ import annotations

import torch

SPLITS = ("calib", "eval")


def builtin_text(split: str) -> str:
    """English text from CPython's ``pydoc_data.topics`` (~460 KB), in two disjoint halves.

    ``"calib"`` holds the topics whose sorted index is even, ``"eval"`` those whose index is odd, so
    both halves cover the same kind of prose and code while sharing no topic.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)[SPLITS.index(split) :: 2]
    return "\n\n".join(topics[k] for k in keys)


def token_sequences(tokenizer, text: str, seq_len: int, n_seqs: int | None = None, *, what: str = "calibration") -> torch.Tensor:
    """Tokenize ``text`` and cut it into ``n_seqs`` consecutive sequences of ``seq_len`` tokens.

    Returns
    -------
    Tensor of int64, shape (n_seqs, seq_len). ``n_seqs=None`` takes as many whole sequences as fit.

    Raises ``ValueError`` when the text holds fewer than ``n_seqs * seq_len`` tokens, saying how many
    are needed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if n_seqs is not None and (isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1):
        raise ValueError(f"the number of {what} sequences must be an int >= 1, got {n_seqs!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    fit = ids.numel() // seq_len
    need = (n_seqs or 1) * seq_len
    if fit == 0 or (n_seqs is not None and fit < n_seqs):
        raise ValueError(
            f"{what} text too short: need {need} tokens ({n_seqs or 1} x {seq_len}), got {ids.numel()}"
        )
    n = fit if n_seqs is None else n_seqs
    return ids[: n * seq_len].reshape(n, seq_len).clone()
