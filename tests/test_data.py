"""Data pipeline on the pinned fixture corpus (tests/fixtures/corpus), plus one stdlib smoke test.

Expected documents and pieces are computed here from the files on disk, independently of
``experiments.data``.
"""
import collections
import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

from experiments import data

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "corpus"
L, B, VAL_EVERY = 32, 4, 4
KW = dict(source=str(FIXTURE), seq_len=L, batch_size=B, val_every=VAL_EVERY)


def fixture_files():
    """Sorted relative paths of the fixture, skipping hidden names (written out by hand)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(FIXTURE):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [pathlib.Path(dirpath, f).relative_to(FIXTURE).as_posix()
                for f in filenames if not f.startswith(".")]
    return sorted(out)


def split_docs(split):
    names = fixture_files()
    return {n: (FIXTURE / n).read_bytes() for i, n in enumerate(names)
            if (i % VAL_EVERY == 0) == (split == "validation")}


def expected_pieces(split):
    """Multiset of pieces (bytes of inputs + final target) of every document of the split."""
    pieces = collections.Counter()
    for doc in split_docs(split).values():
        for j in range(0, len(doc) - 1, L):
            pieces[doc[j:j + L + 1]] += 1
    return pieces


def segments(batch):
    """Yields (inputs, targets, positions, loss_mask) of every segment of every row."""
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            yield tuple(batch[k][row, idx] for k in ("inputs", "targets", "positions",
                                                     "loss_mask"))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def check_batch_format(batch):
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k, v in batch.items():
        assert v.shape == (B, L), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k


def test_fixture_listing_skips_hidden_and_sorts():
    corpus = data.load_corpus(str(FIXTURE))
    assert list(corpus.names) == fixture_files()
    assert ".hidden.txt" not in corpus.names
    assert corpus.tokens.tobytes() == b"".join((FIXTURE / n).read_bytes()
                                               for n in fixture_files())


@pytest.mark.parametrize("split", ["train", "validation"])
def test_pack_one_epoch_yields_exactly_the_document_pieces(split):
    batches = list(data.make_iterator(split, packing="pack", num_epochs=1, seed=3, **KW))
    got = collections.Counter()
    for batch in batches:
        check_batch_format(batch)
        pad = batch["segment_ids"] == 0
        assert np.all(batch["loss_mask"][pad] == 0) and np.all(batch["inputs"][pad] == 0)
        for inp, tgt, pos, mask in segments(batch):
            assert np.array_equal(pos, np.arange(len(inp)))
            assert np.array_equal(inp[1:], tgt[:-1]), "targets = inputs shifted by one"
            assert np.all(mask == 1)
            got[bytes(np.append(inp, tgt[-1]).astype(np.uint8))] += 1
    assert got == expected_pieces(split)
    # each piece is a contiguous run of one of the split's files
    docs = split_docs(split).values()
    assert all(any(p in d for d in docs) for p in got)


def test_splits_are_disjoint_by_file_and_cover_the_corpus():
    train, val = split_docs("train"), split_docs("validation")
    assert not set(train) & set(val) and set(train) | set(val) == set(fixture_files())
    docs = data.validation_documents(data.DataConfig(str(FIXTURE), val_every=VAL_EVERY))
    assert all(d.dtype == np.int32 for d in docs)
    assert [d.astype(np.uint8).tobytes() for d in docs] == list(val.values())
    # no training piece comes from a validation-only file (checked on the piece multisets)
    assert not set(expected_pieces("train")) & set(expected_pieces("validation"))


def test_validation_is_a_seed_free_single_pass_with_padded_last_batch():
    a = list(data.make_iterator("validation", packing="pack", **KW))
    b = list(data.make_iterator("validation", packing="pack", seed=99, **KW))
    assert_batches_equal(a, b)  # the seed does not matter for validation
    for batch in a[:-1]:
        assert np.all(batch["segment_ids"].max(axis=1) > 0)
    last = a[-1]
    check_batch_format(last)
    real = last["segment_ids"].max(axis=1) > 0
    assert real[0] and not real.all(), "the fixture's validation rows do not fill 6 batches"
    assert np.all(np.diff(real.astype(int)) <= 0), "padding rows come last"
    assert all(not v[~real].any() for v in last.values())


def test_chunk_validation_is_the_sorted_stream():
    stream = b"".join(split_docs("validation").values())
    batches = list(data.make_iterator("validation", packing="chunk", **KW))
    for batch in batches:
        check_batch_format(batch)
    inputs, targets, seg, pos, mask = (np.concatenate([b[k] for b in batches]) for k in (
        "inputs", "targets", "segment_ids", "positions", "loss_mask"))
    real = seg.any(axis=1)
    assert real.sum() == (len(stream) - 1) // L and np.all(real[:real.sum()])
    for k, (inp, tgt) in enumerate(zip(inputs[real], targets[real])):
        assert inp.astype(np.uint8).tobytes() == stream[k * L:k * L + L]
        assert tgt.astype(np.uint8).tobytes() == stream[k * L + 1:k * L + L + 1]
    assert np.all(pos[real] == np.arange(L)) and np.all(seg[real] == 1)
    assert np.all(mask[real] == 1) and not mask[~real].any()


def test_chunk_stride_gives_overlapping_windows():
    stream = b"".join(split_docs("validation").values())
    stride = L // 4   # HMT's official windows: one segment of a row of four
    batches = list(data.make_iterator("validation", packing="chunk", chunk_stride=stride, **KW))
    inputs, targets, seg = (np.concatenate([b[k] for b in batches])
                            for k in ("inputs", "targets", "segment_ids"))
    real = seg.any(axis=1)
    assert real.sum() == (len(stream) - 1 - L) // stride + 1
    for k, (inp, tgt) in enumerate(zip(inputs[real], targets[real])):
        assert inp.astype(np.uint8).tobytes() == stream[k * stride:k * stride + L]
        assert tgt.astype(np.uint8).tobytes() == stream[k * stride + 1:k * stride + L + 1]
    with pytest.raises(ValueError, match="chunk_stride.*packing='chunk' only"):
        data.DataConfig(chunk_stride=8)
    with pytest.raises(ValueError, match=r"chunk_stride.*\[1, seq_len=32\], got 33"):
        data.make_iterator("validation", packing="chunk", chunk_stride=L + 1, **KW)


def test_tokenizer_reads_the_files_as_its_tokens():
    import tokenizers

    folder = pathlib.Path(__file__).parent / "fixtures" / "pretrained" / "llama_gqa_llama3"
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = data.DataConfig(str(FIXTURE), val_every=VAL_EVERY, tokenizer=str(folder))
    docs = data.validation_documents(config)
    expected = [tok.encode(d.decode("utf-8", "replace"), add_special_tokens=False).ids
                for d in split_docs("validation").values()]
    assert [d.tolist() for d in docs] == expected
    every_file = [(FIXTURE / n).read_bytes().decode("utf-8", "replace") for n in fixture_files()]
    assert data.corpus_manifest(config)["tokens"] == sum(
        len(tok.encode(text, add_special_tokens=False).ids) for text in every_file)
    batch = next(data.make_iterator("train", packing="chunk", tokenizer=str(folder), **KW))
    assert batch["inputs"].max() >= 256, "token ids, not bytes"


def test_chunk_train_epochs_cover_the_stream_in_new_orders():
    train = b"".join(split_docs("train").values())
    rows_per_epoch = (len(train) - 1) // L
    batches = list(data.make_iterator("train", packing="chunk", num_epochs=2, seed=1, **KW))
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert len(inputs) == -(-2 * rows_per_epoch // B) * B
    inputs, targets = inputs[:2 * rows_per_epoch], targets[:2 * rows_per_epoch]
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])
    epoch0 = collections.Counter(inputs[:rows_per_epoch].ravel().tolist())
    full = collections.Counter(train)
    assert not epoch0 - full and sum((full - epoch0).values()) == len(train) - rows_per_epoch * L
    rows0 = {r.tobytes() for r in inputs[:rows_per_epoch]}
    rows1 = {r.tobytes() for r in inputs[rows_per_epoch:]}
    assert rows0 != rows1, "documents are re-permuted every epoch"


@pytest.mark.parametrize("packing", ["pack", "chunk"])
def test_seed_determinism(packing):
    a = take(data.make_iterator("train", packing=packing, seed=5, **KW), 6)
    b = take(data.make_iterator("train", packing=packing, seed=5, **KW), 6)
    c = take(data.make_iterator("train", packing=packing, seed=6, **KW), 6)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", ["pack", "chunk"])
@pytest.mark.parametrize("k", [0, 7, 100])  # an epoch of the fixture is about 70 batches
def test_state_round_trip_is_bitwise(packing, k):
    it = data.make_iterator("train", packing=packing, seed=2, **KW)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 12)
    fresh = data.make_iterator("train", packing=packing, seed=2, **KW)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 12), expected)


def test_training_repeats_forever():
    pieces = sum(expected_pieces("train").values())
    it = data.make_iterator("train", packing="pack", **KW)
    assert len(take(it, 3 * pieces // B)) == 3 * pieces // B


def test_text_file_source_and_glob():
    story = FIXTURE / "story.txt"
    docs = data.validation_documents(data.DataConfig(str(story)))
    assert len(docs) == 1 and docs[0].astype(np.uint8).tobytes() == story.read_bytes()
    corpus = data.load_corpus(str(FIXTURE), glob="*.py")
    assert list(corpus.names) == [n for n in fixture_files() if n.endswith(".py")]


def test_caps_keep_a_sorted_prefix():
    names = fixture_files()
    assert list(data.load_corpus(str(FIXTURE), max_files=3).names) == names[:3]
    sizes = np.cumsum([(FIXTURE / n).stat().st_size for n in names])
    corpus = data.load_corpus(str(FIXTURE), max_bytes=int(sizes[4]) + 1)
    assert list(corpus.names) == names[:5]


def test_manifest(tmp_path):
    manifest = data.corpus_manifest(data.DataConfig(str(FIXTURE), val_every=VAL_EVERY))
    blob = b"".join((FIXTURE / n).read_bytes() for n in fixture_files())
    assert manifest["sha256"] == hashlib.sha256(blob).hexdigest()
    assert manifest["files"] == len(fixture_files()) and manifest["bytes"] == len(blob)
    assert manifest["validation_files"] == len(split_docs("validation"))
    path = data.write_manifest(str(tmp_path / "run"), manifest)
    assert path.endswith("corpus.json") and json.loads(pathlib.Path(path).read_text()) == manifest


def test_data_config_drives_iterator_manifest_and_validation_documents():
    config = data.DataConfig(str(FIXTURE), val_every=VAL_EVERY)
    assert data.corpus_manifest(config)["validation_files"] == len(split_docs("validation"))
    assert data.corpus_manifest(data.DataConfig(str(FIXTURE), max_files=2))["files"] == 2
    assert data.corpus_manifest()["source"] == "stdlib"
    got = take(config.iterator("train", seq_len=L, batch_size=B, seed=4), 3)
    want = take(data.make_iterator("train", seed=4, **KW), 3)
    assert_batches_equal(got, want)
    with pytest.raises(ValueError, match="DataConfig: `packing`.*'pack', 'chunk'"):
        data.DataConfig(packing="zip")


def test_state_encoding_is_plain_json():
    it = data.make_iterator("train", packing="pack", **KW)
    take(it, 3)
    encoded = data.encode_state(it.get_state())
    expected = take(it, 4)
    fresh = data.make_iterator("train", packing="pack", **KW)
    fresh.set_state(data.decode_state(json.loads(json.dumps(encoded))))
    assert_batches_equal(take(fresh, 4), expected)


def test_stdlib_corpus_smoke():
    manifest = data.corpus_manifest()
    assert manifest["files"] > 50 and 0 < manifest["bytes"] <= data.STDLIB_MAX_BYTES
    assert len(manifest["sha256"]) == 64 and manifest["python_version"]
    batch = next(data.make_iterator("train", seq_len=128, batch_size=16))
    assert batch["inputs"].shape == (16, 128) and batch["loss_mask"].sum() > 0


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(packing="zip"), ValueError, ["packing", "'pack'", "'chunk'"]),
    (dict(seq_len=1), ValueError, ["seq_len", ">= 2"]),
    (dict(batch_size=0), ValueError, ["batch_size"]),
    (dict(seed=-1), ValueError, ["seed"]),
    (dict(val_every=1), ValueError, ["val_every"]),
    (dict(max_files=0), ValueError, ["max_files"]),
    (dict(split="test"), ValueError, ["split", "'train'", "'validation'"]),
    (dict(source="/no/such/corpus"), FileNotFoundError, ["/no/such/corpus"]),
    (dict(glob="*.nothing"), ValueError, ["empty corpus"]),
    (dict(source=str(FIXTURE / "story.txt")), ValueError, ["train", "no document"]),
    (dict(max_files=1), ValueError, ["train", "no document"]),
])
def test_errors_name_the_problem(kwargs, error, words):
    args = dict(KW, split="train")
    args.update(kwargs)
    split = args.pop("split")
    with pytest.raises(error) as info:
        data.make_iterator(split, **args)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        data.make_iterator("train", source=str(tmp_path), seq_len=8, batch_size=2)


def test_chunk_needs_one_full_row():
    with pytest.raises(ValueError, match="seq_len"):
        data.make_iterator("validation", source=str(FIXTURE), packing="chunk", seq_len=4096,
                           batch_size=1, val_every=VAL_EVERY)


def test_encode_decode():
    tokens = data.encode("pass key é")
    assert tokens.dtype == np.int32 and tokens.max() < data.VOCAB_SIZE
    assert data.decode(tokens) == "pass key é"


def test_each_process_reads_its_rows_of_the_same_global_batches():
    kw = dict(seq_len=16, batch_size=4, source=FIXTURE, val_every=3)
    whole = next(data.make_iterator("train", **kw))
    parts = [next(data.make_iterator("train", process_index=i, process_count=2, **kw))
             for i in range(2)]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.make_iterator("train", process_index=0, process_count=3, **kw)
