"""Synthetic long-context tasks, byte-level (token = byte, vocabulary 256 unless stated).

Passkey retrieval (LM-Infinite / Landmark format). The prompt is five parts joined by ``"\\n"``::

    PREFIX \\n FILLER[:a] \\n NEEDLE \\n FILLER[a:n] \\n QUERY

with ``PREFIX``, ``NEEDLE`` (``"The pass key is K. Remember it. K is the pass key."``) and
``QUERY`` (``"What is the pass key? The pass key is"``) below, and ``FILLER`` the sentence block
``FILLER_UNIT + " "`` repeated and cut to exactly ``n`` bytes (the cut may fall mid-word).

- Length rule: ``n = target_length - (len(PREFIX) + len(NEEDLE) + len(QUERY) + 4)``, so the
  prompt is exactly ``target_length`` tokens; the smallest valid ``target_length`` is the value
  at ``n = 0`` (``passkey_min_length(digits)``; 247 for 5 digits).
- Depth rule: ``a = round(depth * n)`` (Python's round, half to even), so the needle starts at
  token ``needle_start = len(PREFIX) + 1 + a + 1``: depth 0 puts it right after the prefix,
  depth 1 right before the query.
- The answer is ``" K"`` *with* its leading space (the prompt ends with ``"is"``), i.e. the
  ``digits + 1`` tokens a model should produce next.

MQAR (multi-query associative recall, Zoology style) layout of one row of ``seq_len`` tokens,
``P = num_pairs``::

    k_1 v_1 k_2 v_2 ... k_P v_P | 0 ... 0 k_σ(1) 0 ... k_σ(2) 0 ... 0

With ``V = vocab_size`` and ``h = (V - 1) // 2``, keys are drawn from ``[1, 1 + h)`` and values
from ``[1 + h, V)``, both without replacement within a row; token 0 is filler. After the ``2P``
context tokens every key is queried once, in a random order ``σ``, at ``P`` distinct uniformly
drawn positions of the remaining ``seq_len - 2P``. At a query position ``q``: ``targets[q]`` is
the key's value and ``loss_mask[q] = 1``; everywhere else ``targets = 0`` and ``loss_mask = 0``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.data import encode
from lcattn import checks

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize them. I will quiz you about the important information there.")
FILLER_UNIT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
               "There and back again.")
QUERY = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Passkey:
    """The passkey grid of an evaluation: ``trials`` prompts per (length, depth) cell, at
    lengths ``multipliers x`` the evaluation's length unit and needle ``depths`` in [0, 1];
    ``trials=0`` skips it. Registered with gin as ``tasks.Passkey``."""

    depths: tuple = (0.1, 0.5, 0.9)
    trials: int = 2
    multipliers: tuple = (2, 4, 8)

    def __post_init__(self):
        checks.integer("Passkey", "trials", self.trials, minimum=0)
        checks.integers("Passkey", "multipliers", self.multipliers)
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"Passkey: `depths` must lie in [0, 1], got {self.depths!r}")


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _encoder(tokenizer):
    """``text -> int32 tokens``: bytes (``tokenizer=None``) or a ``tokenizers.Tokenizer``
    without special tokens."""
    if tokenizer is None:
        return encode
    return lambda text: np.asarray(tokenizer.encode(text, add_special_tokens=False).ids,
                                   np.int32)


def passkey_min_length(digits: int = 5, tokenizer=None) -> int:
    """Shortest prompt (no filler) for a ``digits``-digit key (in bytes, or in ``tokenizer``'s
    tokens, each part encoded on its own)."""
    enc = _encoder(tokenizer)
    return (len(enc(PREFIX)) + len(enc(_needle("0" * digits))) + len(enc(QUERY))
            + 4 * len(enc("\n")))


def _filler(n: int, enc) -> np.ndarray:
    """The first ``n`` tokens of ``FILLER_UNIT + " "`` repeated."""
    units = max(n // max(len(enc(FILLER_UNIT + " ")), 1) + 2, 2)
    while True:
        tokens = enc((FILLER_UNIT + " ") * units)
        if len(tokens) >= n:
            return tokens[:n]
        units *= 2


def passkey_example(target_length: int, depth: float, *, digits: int = 5,
                    seed: int = 0, tokenizer=None) -> dict:
    """One passkey prompt of exactly ``target_length`` tokens (rules in the module doc).

    Tokens are bytes, or, with a ``tokenizers.Tokenizer``, its tokens: each part (prefix,
    newline, needle, query) is encoded on its own and the filler is cut to ``n`` tokens, so
    the length and depth rules hold in tokens. Returns dict(prompt=int32 [target_length],
    answer=int32 tokens of ``" K"`` (leading space included), key=str of ``digits`` digits
    (first digit non-zero), needle_start=int index of the needle's first token in ``prompt``).
    """
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    enc = _encoder(tokenizer)
    rng = np.random.default_rng(seed)
    key = str(rng.integers(10 ** (digits - 1), 10 ** digits))
    prefix, newline, needle, query = (enc(x) for x in (PREFIX, "\n", _needle(key), QUERY))
    minimum = passkey_min_length(digits, tokenizer)
    if target_length < minimum:
        raise ValueError(f"target_length={target_length} is too short: a {digits}-digit passkey "
                         f"prompt needs at least {minimum} tokens")
    n = target_length - (len(prefix) + len(needle) + len(query) + 4 * len(newline))
    filler = _filler(n, enc)
    a = int(round(depth * n))
    prompt = np.concatenate([prefix, newline, filler[:a], newline, needle, newline, filler[a:n],
                             newline, query]).astype(np.int32)
    return dict(prompt=prompt, answer=enc(" " + key), key=key,
                needle_start=len(prefix) + len(newline) + a + len(newline))


def mqar_batch(batch_size: int, seq_len: int, num_pairs: int, vocab_size: int,
               seed: int) -> dict:
    """A batch of MQAR rows (layout in the module doc), shapes ``[batch_size, seq_len]``.

    Returns the trainer's batch format: ``inputs``, ``targets``, ``segment_ids`` (all 1),
    ``positions`` (``arange``) as int32 and ``loss_mask`` float32 (1 only on query positions).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if seq_len < 3 * num_pairs:
        raise ValueError(f"seq_len must be >= 3 * num_pairs = {3 * num_pairs} (pairs, then one "
                         f"query per key), got {seq_len}")
    if vocab_size < 2 * num_pairs + 1:
        raise ValueError(f"vocab_size must be >= 2 * num_pairs + 1 = {2 * num_pairs + 1} "
                         f"(filler 0, distinct keys and values), got {vocab_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    half = (vocab_size - 1) // 2
    rows = np.arange(batch_size)[:, None]
    keys = 1 + rng.permuted(np.tile(np.arange(half), (batch_size, 1)), axis=1)[:, :num_pairs]
    values = 1 + half + rng.permuted(np.tile(np.arange(vocab_size - 1 - half), (batch_size, 1)),
                                     axis=1)[:, :num_pairs]
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    inputs[:, 0:2 * num_pairs:2], inputs[:, 1:2 * num_pairs:2] = keys, values
    free = seq_len - 2 * num_pairs
    query_pos = 2 * num_pairs + np.sort(
        rng.permuted(np.tile(np.arange(free), (batch_size, 1)), axis=1)[:, :num_pairs], axis=1)
    order = rng.permuted(np.tile(np.arange(num_pairs), (batch_size, 1)), axis=1)
    inputs[rows, query_pos] = keys[rows, order]
    targets[rows, query_pos] = values[rows, order]
    loss_mask = np.zeros((batch_size, seq_len), np.float32)
    loss_mask[rows, query_pos] = 1.0
    return dict(inputs=inputs, targets=targets, loss_mask=loss_mask,
                segment_ids=np.ones((batch_size, seq_len), np.int32),
                positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                          (batch_size, seq_len)).copy())
