"""Built-in text (no download), its cutting into token sequences for calibration and evaluation; chat prompts."""

from __future__ import annotations

import torch

from ._validate import int_at_least, int_between

SPLITS = ("calib", "eval")

# One-turn chat prompts for `rankwise eval --chat`: code, arithmetic, facts, explanation, writing, rewriting,
# lists, reasoning and advice, short enough that a 135M model's answer is a few dozen tokens. The order
# mixes the kinds so that the first N prompts stay varied for any N.
CHAT_PROMPTS = (
    "Write a Python function that returns the square of a number.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 17 plus 25?",
    "Give me three tips for getting better sleep.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Name the planets of the solar system in order from the sun.",
    "Write a short, polite email declining a meeting invitation.",
    "If a train travels 60 kilometers in one hour, how far does it travel in three hours?",
    "What does HTTP stand for?",
    "Rewrite this sentence to be more formal: 'gonna be late, sorry'.",
    "Explain what a black hole is to a ten-year-old.",
    "Write a SQL query that counts the rows of a table named orders.",
    "What are the three primary colors?",
    "Suggest a name for a coffee shop that also sells books.",
    "Why do we have seasons on Earth?",
    "Write a bash command that lists the files in the current directory, newest first.",
    "What is photosynthesis?",
    "Give one advantage and one disadvantage of working from home.",
    "Complete the sequence: 2, 4, 8, 16, ...",
)


def chat_prompts(n: int) -> list[str]:
    """The first ``n`` of the built-in chat prompts (``len(CHAT_PROMPTS)`` of them)."""
    int_between(n, "the number of chat prompts", 1, len(CHAT_PROMPTS))
    return list(CHAT_PROMPTS[:n])


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


def token_sequences(
    tokenizer, text: str, seq_len: int, n_seqs: int | None = None, *, what: str = "calibration"
) -> torch.Tensor:
    """Tokenize ``text`` and cut it into ``n_seqs`` consecutive sequences of ``seq_len`` tokens.

    Returns
    -------
    Tensor of int64, shape (n_seqs, seq_len). ``n_seqs=None`` takes as many whole sequences as fit.

    Raises ``ValueError`` when the text holds fewer than ``n_seqs * seq_len`` tokens, saying how many
    are needed.
    """
    int_at_least(seq_len, "seq_len", 2)
    if n_seqs is not None:
        int_at_least(n_seqs, f"the number of {what} sequences", 1)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    fit = ids.numel() // seq_len
    need = (n_seqs or 1) * seq_len
    if fit == 0 or (n_seqs is not None and fit < n_seqs):
        raise ValueError(f"{what} text too short: need {need} tokens ({n_seqs or 1} x {seq_len}), got {ids.numel()}")
    n = fit if n_seqs is None else n_seqs
    return ids[: n * seq_len].reshape(n, seq_len).clone()
