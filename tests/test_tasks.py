"""Passkey prompts and MQAR batches, checked against the literal strings and layout rules."""
import numpy as np
import pytest

from experiments import tasks

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUERY = "What is the pass key? The pass key is"


def text(tokens):
    assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 256
    return tokens.astype(np.uint8).tobytes().decode("utf-8")


def needle(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@pytest.mark.parametrize("length", [tasks.passkey_min_length(), 300, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_passkey_length_depth_and_content(length, depth):
    ex = tasks.passkey_example(length, depth, seed=int(depth * 100) + length)
    prompt, key = text(ex["prompt"]), ex["key"]
    assert len(ex["prompt"]) == length
    assert len(key) == 5 and key.isdigit() and key[0] != "0"
    assert text(ex["answer"]) == " " + key
    # the needle sits where the rule puts it (+-1 token)
    span = length - len(PREFIX) - len(needle(key)) - len(QUERY) - 4
    rule = len(PREFIX) + 2 + round(depth * span)
    assert abs(ex["needle_start"] - rule) <= 1
    start = ex["needle_start"]
    assert prompt[start:start + len(needle(key))] == needle(key)
    assert prompt.count(key) == 2
    # outside the needle: prefix, filler cut to span bytes, query
    assert prompt.startswith(PREFIX + "\n") and prompt.endswith("\n" + QUERY)
    before = prompt[len(PREFIX) + 1:start - 1]
    after = prompt[start + len(needle(key)) + 1:len(prompt) - len(QUERY) - 1]
    assert prompt[start - 1] == "\n" == prompt[start + len(needle(key))]
    assert before + after == ((FILLER + " ") * (span // len(FILLER) + 1))[:span]


def test_passkey_digits_and_seed():
    ex = tasks.passkey_example(500, 0.5, digits=1, seed=0)
    assert len(ex["key"]) == 1 and len(ex["prompt"]) == 500
    keys = {tasks.passkey_example(500, 0.3, seed=s)["key"] for s in range(20)}
    assert len(keys) > 15
    a, b = (tasks.passkey_example(800, 0.4, seed=7) for _ in range(2))
    assert a["key"] == b["key"] and np.array_equal(a["prompt"], b["prompt"])


def test_passkey_errors():
    minimum = tasks.passkey_min_length(5)
    with pytest.raises(ValueError, match=f"at least {minimum}"):
        tasks.passkey_example(minimum - 1, 0.5)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey_example(1000, 1.5)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey_example(1000, -0.1)
    with pytest.raises(ValueError, match="digits"):
        tasks.passkey_example(1000, 0.5, digits=0)


@pytest.mark.parametrize("seq_len, num_pairs, vocab", [(64, 8, 128), (12, 4, 9), (256, 32, 8192)])
def test_mqar_answers_match_the_pairs(seq_len, num_pairs, vocab):
    b = tasks.mqar_batch(6, seq_len, num_pairs, vocab, seed=3)
    for k, v in b.items():
        assert v.shape == (6, seq_len), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    assert np.all(b["segment_ids"] == 1) and np.all(b["positions"] == np.arange(seq_len))
    half = (vocab - 1) // 2
    for inp, tgt, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
        keys, values = inp[0:2 * num_pairs:2], inp[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
        assert np.all((1 <= keys) & (keys <= half)) and np.all((half < values) & (values < vocab))
        pairs = dict(zip(keys.tolist(), values.tolist()))
        queries = np.flatnonzero(mask)
        assert len(queries) == num_pairs and queries.min() >= 2 * num_pairs
        assert sorted(inp[queries].tolist()) == sorted(keys.tolist())  # each key once
        assert all(tgt[q] == pairs[inp[q]] for q in queries)
        rest = np.setdiff1d(np.arange(2 * num_pairs, seq_len), queries)
        assert not inp[rest].any() and not np.delete(tgt, queries).any()


def test_mqar_seeded_and_validated():
    a, b, c = (tasks.mqar_batch(4, 64, 8, 64, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], c["inputs"])
    with pytest.raises(ValueError, match="seq_len"):
        tasks.mqar_batch(2, 20, 8, 64, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        tasks.mqar_batch(2, 64, 8, 16, seed=0)
    with pytest.raises(ValueError, match="num_pairs"):
        tasks.mqar_batch(2, 64, 0, 64, seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(multipliers=(2, 0)), r"Passkey: `multipliers` must be integers >= 1, got \(2, 0\)"),
    (dict(multipliers=(2.0,)), "`multipliers` must be integers"),
    (dict(trials=-1), "`trials` must be an integer >= 0"),
    (dict(depths=(0.5, 1.5)), r"`depths` must lie in \[0, 1\]"),
])
def test_passkey_grid_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tasks.Passkey(**kwargs)
