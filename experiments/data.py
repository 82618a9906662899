"""Byte-level text corpus and the grain pipeline that turns it into LM batches.

Corpus (``source``)
    ``"stdlib"`` (default): the CPython standard library's own ``.py`` sources under
    ``sysconfig.get_paths()["stdlib"]``, skipping the folders ``site-packages``, ``test``,
    ``tests``, ``idlelib``, ``tkinter``, ``encodings`` (repetitive codec tables),
    ``turtledemo``, ``lib2to3`` and ``__pycache__``.
    Any other string is a path: a text file (one document) or a folder (every file under it,
    skipping hidden names and ``__pycache__``, optionally only those whose relative path
    matches ``glob``, e.g. ``"*.py"``, via ``PurePosixPath.match``).
    Files are sorted by relative POSIX path (string order), then capped: the longest sorted
    prefix with at most ``max_files`` files and at most ``max_bytes`` bytes in total. ``None``
    means the source's default: for ``"stdlib"`` ``max_bytes = STDLIB_MAX_BYTES`` (4 MiB; on
    CPython 3.11.7 that is 246 files, ``__future__.py`` to ``importlib/util.py``, 4,096,139
    bytes) and no file cap; a path has no cap. ``corpus_manifest`` records the subset (file
    count, bytes, sha256 of the files concatenated in sorted order, Python version).

Tokens: one document per file, token = byte value (``VOCAB_SIZE = 256``, no special tokens);
with ``tokenizer`` (a Hugging Face-format model folder, e.g. a pretrained backbone's) each file
is tokenized by its ``tokenizer.json`` instead and "byte" below reads "token".

Split by file: the file at sorted index ``i`` (within the capped subset) is validation iff
``i % val_every == 0`` (default every 20th, starting with the first), otherwise train. Because
the cap keeps a sorted prefix, raising the cap never moves a file between splits.

Pipeline (``make_dataset`` / ``make_iterator``), in this order. ``L = seq_len``; a document of
``n`` bytes gives ``n - 1`` (input, target = next byte) pairs, so no position ever predicts
across a document boundary and the last byte of a document only appears as a target.

``packing="pack"`` (document packing):
    1. split every document of the split into pieces of at most ``L`` pairs (piece ``j`` holds
       tokens ``[j*L, j*L + L + 1)``; documents of fewer than 2 bytes are dropped);
    2. train: shuffle the pieces with ``seed`` (``MapDataset.shuffle``), reshuffled every
       epoch; validation: sorted order;
    3. repeat ``num_epochs`` times;
    4. first-fit pack into rows of ``L`` (``grain.experimental.FirstFitPackIterDataset`` with
       ``batch_size`` bins; train also shuffles the bins of each packing round with ``seed``);
    5. batch.
    Rows: ``segment_ids`` 1, 2, ... per piece (0 = padding), ``positions`` restart at 0 for every
    piece, ``loss_mask`` 1 on every non-padding position.

``packing="chunk"`` (concatenate and chunk):
    1. train: the documents of the split in an order permuted by ``(seed, epoch)``;
       validation: sorted order; concatenated into one stream of ``S`` bytes (no separator);
    2. chunk into ``R = (S - 1) // L`` rows; row ``k`` is stream bytes ``[k*L, k*L + L + 1)``
       (consecutive rows overlap by one byte, so every pair is used once; the tail is dropped);
       ``inputs = row[:-1]``, ``targets = row[1:]``. With ``chunk_stride = s`` rows start every
       ``s`` bytes instead (``R = (S - 1 - L) // s + 1``, row ``k`` = ``[k*s, k*s + L + 1)``):
       overlapping windows, as HMT's official training samples them (``s`` = one segment);
    3. train: rows shuffled with ``seed``, reshuffled every epoch; repeat; batch.
    Rows: ``segment_ids`` all 1, ``positions = arange(L)``, ``loss_mask`` all 1 (targets may
    cross document boundaries in this mode).

Batches are dicts of numpy arrays of shape ``[batch_size, seq_len]``: ``inputs``, ``targets``,
``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32). Training repeats forever
(``num_epochs=None``); validation makes one pass. A finite run (validation, or train with an int
``num_epochs``) pads its last batch with all-zero rows (``segment_ids == loss_mask == 0``), so
every batch has the same shape and nothing is dropped.

Iterator state: ``make_iterator(...).get_state()`` is a small dict of ints (grain's own state),
so ``json.dumps`` handles it (``encode_state`` / ``decode_state`` make the plain-JSON copy);
``set_state`` on a fresh iterator built with the same arguments resumes bitwise-exactly.

``DataConfig`` groups the corpus and pipeline options (everything but the split, the row
length, the batch size and the seed), registered with gin as ``data.DataConfig``;
``train``/``evaluate`` take one (``train.data = @data.DataConfig()``) and hand it to
``iterator``, ``corpus_manifest`` and ``validation_documents``, so one set of bindings
(``data.DataConfig.source = ...``) configures all three and the code runs without gin.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import sysconfig

import grain
import numpy as np

from lcattn import checks

VOCAB_SIZE = 256
STDLIB_MAX_BYTES = 4 * 2**20
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "tkinter",
                                  "encodings", "turtledemo", "lib2to3", "__pycache__"})
SPLITS = ("train", "validation")
PACKING_MODES = ("pack", "chunk")


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 tokens ``[len(bytes)]``."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Inverse of ``encode``; invalid UTF-8 is replaced by U+FFFD."""
    return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Files of a source in sorted order, all bytes in one read-only array.

    ``tokens[offsets[i]:offsets[i + 1]]`` are the bytes of file ``names[i]``.
    """
    source: str
    root: str
    names: tuple[str, ...]
    tokens: np.ndarray   # uint8 [total_bytes], or int32 token ids (``tokenizer``)
    offsets: np.ndarray  # int64 [num_files + 1]

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def split_ids(self, split: str, val_every: int) -> np.ndarray:
        """Sorted indices of the files of ``split`` (validation iff ``i % val_every == 0``)."""
        checks.choice("Corpus.split_ids", "split", split, SPLITS)
        checks.integer("Corpus.split_ids", "val_every", val_every, minimum=2)
        ids = np.arange(len(self.names))
        return ids[(ids % val_every == 0) == (split == "validation")]


def _list_files(source: str, glob: str | None) -> tuple[pathlib.Path, list[str]]:
    """Root folder and sorted relative POSIX paths of the source's files."""
    if source == "stdlib":
        root, excluded, suffix = pathlib.Path(sysconfig.get_paths()["stdlib"]), \
            STDLIB_EXCLUDED_DIRS, ".py"
    else:
        root, excluded, suffix = pathlib.Path(source), frozenset({"__pycache__"}), ""
        if not root.exists():
            raise FileNotFoundError(f"source path does not exist: {source!r}")
        if root.is_file():
            return root.parent, [root.name]
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        for f in filenames:
            rel = pathlib.PurePosixPath(pathlib.Path(dirpath, f).relative_to(root).as_posix())
            if not f.startswith(".") and f.endswith(suffix) and (glob is None or rel.match(glob)):
                names.append(str(rel))
    return root, sorted(names)


def _cap_bytes(source: str, max_bytes: int | None) -> int | None:
    return STDLIB_MAX_BYTES if source == "stdlib" and max_bytes is None else max_bytes


@functools.lru_cache(maxsize=8)
def _load_corpus(source, max_files, max_bytes, glob) -> Corpus:
    root, names = _list_files(source, glob)
    chunks, total = [], 0
    for name in names[:max_files]:
        data = (root / name).read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            break
        chunks.append(data)
        total += len(data)
    if total == 0:
        raise ValueError(f"empty corpus: source {source!r} (glob={glob!r}, max_files={max_files}, "
                         f"max_bytes={max_bytes}) selects no non-empty files under {str(root)!r}")
    tokens = np.frombuffer(b"".join(chunks), np.uint8)  # read-only view
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    return Corpus(source, str(root), tuple(names[:len(chunks)]), tokens, offsets)


def encode_with(tokenizer, doc: np.ndarray) -> np.ndarray:
    """A document's bytes as a ``tokenizers.Tokenizer``'s ids, int32 ``[n]``: decoded as UTF-8
    (invalid bytes replaced), no special tokens added."""
    text = np.asarray(doc, np.uint8).tobytes().decode("utf-8", "replace")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


@functools.lru_cache(maxsize=4)
def _tokenize(corpus: Corpus, tokenizer: str) -> Corpus:
    from lcattn import pretrained  # tokenizers is only needed here

    tok = pretrained.load_tokenizer(tokenizer)
    docs = [encode_with(tok, corpus.document(i)) for i in range(len(corpus.names))]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens = np.concatenate(docs)
    tokens.flags.writeable = False
    return dataclasses.replace(corpus, tokens=tokens, offsets=offsets)


def load_corpus(source: str = "stdlib", *, max_files: int | None = None,
                max_bytes: int | None = None, glob: str | None = None,
                tokenizer: str | None = None) -> Corpus:
    """The capped, sorted file subset of ``source``, read once per process and argument tuple.

    ``tokenizer``: a Hugging Face-format model folder (its ``tokenizer.json``); every file
    is decoded as UTF-8 and tokenized without special tokens (``tokens`` int32); None: bytes.
    """
    checks.integer("load_corpus", "max_files", max_files, allow_none=True)
    checks.integer("load_corpus", "max_bytes", max_bytes, allow_none=True)
    if source != "stdlib":
        source = str(pathlib.Path(source).expanduser().resolve())
    corpus = _load_corpus(source, max_files, _cap_bytes(source, max_bytes), glob)
    if tokenizer is None:
        return corpus
    return _tokenize(corpus, str(pathlib.Path(tokenizer).expanduser().resolve()))


def _split_docs(corpus: Corpus, split: str, val_every: int, source: str):
    """(start offset, length) of the split's documents with at least 2 bytes."""
    ids = corpus.split_ids(split, val_every)
    starts, lengths = corpus.offsets[ids], np.diff(corpus.offsets)[ids]
    keep = lengths >= 2
    if not keep.any():
        raise ValueError(
            f"split {split!r} of source {source!r} has no document of 2+ bytes "
            f"({len(corpus.names)} files; every {val_every}th file is validation)")
    return starts[keep], lengths[keep]


def _pieces(starts, lengths, seq_len):
    """(start, pairs) of every piece: document pairs cut into runs of at most ``seq_len``."""
    pairs = lengths - 1
    counts = -(-pairs // seq_len)
    doc = np.repeat(np.arange(len(pairs)), counts)
    j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts[doc] + j * seq_len, np.minimum(seq_len, pairs[doc] - j * seq_len)


def _packed_row(x):
    return {"inputs": x["inputs"], "targets": x["targets"],
            "segment_ids": x["inputs_segment_ids"], "positions": x["inputs_positions"]}


def _pack_rows(corpus, starts, lengths, *, seq_len, batch_size, seed, shuffle, num_epochs):
    piece_start, piece_len = _pieces(starts, lengths, seq_len)
    tokens = corpus.tokens

    def piece(i):
        s, n = piece_start[i], piece_len[i]
        return {"inputs": tokens[s:s + n], "targets": tokens[s + 1:s + n + 1]}

    ds = grain.MapDataset.range(len(piece_start))
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map(piece)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle)
    return ds.map(_packed_row)


def _chunk_rows(corpus, starts, lengths, *, seq_len, seed, shuffle, num_epochs, source, split,
                stride):
    total = int(lengths.sum())
    num_rows = (total - 1 - seq_len) // stride + 1 if total > seq_len else 0
    if num_rows < 1:
        raise ValueError(f"split {split!r} of source {source!r} has {total} bytes, fewer than "
                         f"seq_len + 1 = {seq_len + 1} needed for one chunk")
    tokens = corpus.tokens
    segment_ids = np.ones(seq_len, np.int32)
    positions = np.arange(seq_len, dtype=np.int32)

    def row(index, k):
        order = (np.random.default_rng([seed, index // num_rows]).permutation(len(starts))
                 if shuffle else np.arange(len(starts)))
        ends = np.cumsum(lengths[order])
        begin, end = k * stride, k * stride + seq_len + 1
        d = int(np.searchsorted(ends, begin, side="right"))
        parts = []
        while end > begin:
            off = begin - (ends[d] - lengths[order[d]])
            take = min(int(ends[d]) - begin, end - begin)
            parts.append(tokens[starts[order[d]] + off:starts[order[d]] + off + take])
            begin += take
            d += 1
        r = np.concatenate(parts)
        return {"inputs": r[:-1], "targets": r[1:], "segment_ids": segment_ids,
                "positions": positions}

    ds = grain.MapDataset.range(num_rows)
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map_with_index(row)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0))


def _finalize(batch_size):
    def fn(b):
        out = {k: b[k].astype(np.int32) for k in ("inputs", "targets", "segment_ids",
                                                  "positions")}
        out["loss_mask"] = (out["segment_ids"] > 0).astype(np.float32)
        missing = batch_size - out["inputs"].shape[0]
        if missing:  # the last batch of a finite run: pad with empty rows
            out = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in out.items()}
        return out
    return fn


def make_dataset(split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 source: str = "stdlib", packing: str = "pack", max_files: int | None = None,
                 max_bytes: int | None = None, glob: str | None = None, val_every: int = 20,
                 num_epochs: int | None = None, chunk_stride: int | None = None,
                 tokenizer: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """The grain ``IterDataset`` of batches described in the module docstring.

    Args:
      split: ``"train"`` or ``"validation"``.
      seq_len: row length ``L`` (>= 2).
      batch_size: rows per batch.
      seed: shuffle seed in ``[0, 2**32)`` (train only; validation is in sorted order).
      source: ``"stdlib"`` or a path to a text file or a folder.
      packing: ``"pack"`` (document packing with segment ids) or ``"chunk"``.
      max_files, max_bytes: cap on the sorted file list (``None``: the source's default).
      glob: keep only files whose relative path matches it (``PurePosixPath.match``).
      val_every: every ``val_every``-th file (sorted index ``% val_every == 0``) is validation.
      num_epochs: passes over the split; ``None``: forever for train, once for validation.
      chunk_stride: ``packing="chunk"`` only: rows start every ``chunk_stride`` tokens of the
        stream (``R = (S - 1 - L) // stride + 1`` rows, consecutive rows overlap by
        ``L - stride + 1``); None: ``L`` (no overlap). HMT's official training windows use
        one segment (``configs/memory/hmt_windows.gin``).
      tokenizer: a Hugging Face-format model folder whose ``tokenizer.json`` tokenizes the
        files (``load_corpus``); None: bytes.
      process_index, process_count: this host's share under multi-host training: rows
        ``[i*B/n, (i+1)*B/n)`` of every global batch of ``B = batch_size`` rows. Every host
        builds the same global batches (reading and packing is cheap for byte-level text), so
        a run's data do not depend on the number of hosts.
    """
    checks.choice("make_dataset", "split", split, SPLITS)
    checks.choice("make_dataset", "packing", packing, PACKING_MODES)
    checks.integer("make_dataset", "seq_len", seq_len, minimum=2)
    checks.integer("make_dataset", "batch_size", batch_size)
    checks.integer("make_dataset", "seed", seed, minimum=0, maximum=2**32 - 1)
    checks.integer("make_dataset", "num_epochs", num_epochs, allow_none=True)
    checks.integer("make_dataset", "process_count", process_count)
    checks.integer("make_dataset", "process_index", process_index, minimum=0,
                   maximum=process_count - 1)
    if batch_size % process_count:
        raise ValueError(f"make_dataset: `batch_size` ({batch_size}) must be a multiple of "
                         f"the number of processes ({process_count})")
    checks.integer("make_dataset", "chunk_stride", chunk_stride, allow_none=True)
    if chunk_stride is not None and packing != "chunk":
        raise ValueError(f"make_dataset: `chunk_stride` applies to packing='chunk' only "
                         f"(got packing={packing!r}, chunk_stride={chunk_stride})")
    if chunk_stride is not None and chunk_stride > seq_len:
        raise ValueError(f"make_dataset: `chunk_stride` must be in [1, seq_len={seq_len}], "
                         f"got {chunk_stride}")
    corpus = load_corpus(source, max_files=max_files, max_bytes=max_bytes, glob=glob,
                         tokenizer=tokenizer)
    starts, lengths = _split_docs(corpus, split, val_every, source)
    train = split == "train"
    if num_epochs is None and not train:
        num_epochs = 1
    kw = dict(seq_len=seq_len, seed=seed, shuffle=train, num_epochs=num_epochs)
    if packing == "pack":
        ds = _pack_rows(corpus, starts, lengths, batch_size=batch_size, **kw)
    else:
        ds = _chunk_rows(corpus, starts, lengths, source=source, split=split,
                         stride=chunk_stride or seq_len, **kw)
    ds = ds.batch(batch_size).map(_finalize(batch_size))
    if process_count == 1:
        return ds
    rows = batch_size // process_count
    lo = process_index * rows
    return ds.map(lambda b: {k: v[lo:lo + rows] for k, v in b.items()})


def make_iterator(split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                  source: str = "stdlib", packing: str = "pack", max_files: int | None = None,
                  max_bytes: int | None = None, glob: str | None = None, val_every: int = 20,
                  num_epochs: int | None = None, chunk_stride: int | None = None,
                  tokenizer: str | None = None, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """``iter(make_dataset(...))``: a checkpointable iterator of batches.

    ``get_state()`` returns a JSON-serializable dict of ints; ``set_state(state)`` on an
    iterator made with the same arguments resumes exactly. Arguments as in ``make_dataset``.
    """
    return iter(make_dataset(split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             source=source, packing=packing, max_files=max_files,
                             max_bytes=max_bytes, glob=glob, val_every=val_every,
                             num_epochs=num_epochs, chunk_stride=chunk_stride,
                             tokenizer=tokenizer, process_index=process_index,
                             process_count=process_count))


def encode_state(state: dict) -> dict:
    """``iterator.get_state()`` as a plain JSON object (e.g. for ``ocp.args.JsonSave``)."""
    return json.loads(json.dumps(state))


def decode_state(obj: dict) -> dict:
    """Inverse of ``encode_state``: the state to pass to ``iterator.set_state``."""
    return json.loads(json.dumps(obj))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus and how its rows are built: ``make_dataset``'s arguments other than the
    split, ``seq_len``, ``batch_size`` and ``seed`` (validated when the data is first read)."""

    source: str = "stdlib"
    packing: str = "pack"
    max_files: int | None = None
    max_bytes: int | None = None
    glob: str | None = None
    val_every: int = 20
    num_epochs: int | None = None
    chunk_stride: int | None = None
    tokenizer: str | None = None

    def __post_init__(self):
        checks.choice("DataConfig", "packing", self.packing, PACKING_MODES)
        checks.integer("DataConfig", "chunk_stride", self.chunk_stride, allow_none=True)
        if self.chunk_stride is not None and self.packing != "chunk":
            raise ValueError(f"DataConfig: `chunk_stride` applies to packing='chunk' only "
                             f"(got packing={self.packing!r})")

    def iterator(self, split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
        """``make_iterator(split, ...)`` over this corpus and pipeline."""
        return make_iterator(split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             process_index=process_index, process_count=process_count,
                             **dataclasses.asdict(self))

    def corpus(self) -> Corpus:
        """The capped, sorted file subset this config reads (``load_corpus``)."""
        return load_corpus(self.source, max_files=self.max_files, max_bytes=self.max_bytes,
                           glob=self.glob, tokenizer=self.tokenizer)


def corpus_manifest(config: DataConfig = DataConfig()) -> dict:
    """JSON-able description of ``config``'s corpus: counts, sha256, Python version, paths."""
    corpus, val_every = config.corpus(), config.val_every
    return {
        "source": config.source,
        "root": corpus.root,
        "files": len(corpus.names),
        "bytes": int(corpus.offsets[-1]) if config.tokenizer is None else None,
        "tokens": int(corpus.tokens.size),
        "tokenizer": config.tokenizer,
        "sha256": hashlib.sha256(corpus.tokens.tobytes()).hexdigest(),
        "first_file": corpus.names[0],
        "last_file": corpus.names[-1],
        "train_files": int(corpus.split_ids("train", val_every).size),
        "validation_files": int(corpus.split_ids("validation", val_every).size),
        "max_files": config.max_files,
        "max_bytes": _cap_bytes(config.source, config.max_bytes),
        "glob": config.glob,
        "val_every": val_every,
        "python_version": platform.python_version(),
        "stdlib_path": sysconfig.get_paths()["stdlib"],
    }


def write_manifest(workdir: str, manifest: dict) -> str:
    """Writes ``manifest`` to ``<workdir>/corpus.json``; returns that path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "corpus.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def validation_documents(config: DataConfig = DataConfig()) -> list[np.ndarray]:
    """``config``'s validation files as whole int32 token arrays in sorted order, for
    evaluation at arbitrary lengths."""
    corpus = config.corpus()
    return [corpus.document(i).astype(np.int32)
            for i in corpus.split_ids("validation", config.val_every)]
