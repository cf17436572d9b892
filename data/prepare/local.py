"""The local driver of corpus preparation, `pretrain prepare text` and `pretrain prepare images`:
raw files -> ArrayRecord shards + manifest on one machine.

Text: every input file holds documents (a plain text file is one document, JSONL and Parquet one
per row's `text`). The tokenizer is the one given (SentencePiece or a Hugging Face tokenizer.json,
data/tokenizer.py), else a SentencePiece model trained on the training documents; its files go into
the output. Worker processes tokenise whole files; the main process drops duplicate documents,
assigns each to train or validation by a hash of its content (the same split on every machine),
cuts it into pieces of at most seq_len + 1 tokens (BOS + ids + EOS; a long document is split, never
dropped, and counted in the manifest) and writes one int32 record per piece.

Images: every PNG/JPEG becomes one record (its label and its encoded bytes, not re-encoded);
images under class subdirectories get labels by sorted directory name.

The output is staged and moved into place whole (data/prepare/output.py).
"""

import concurrent.futures
import multiprocessing
import os

import numpy as np
from etils import epath

from data import images
from data import tokenizer as tokenizer_lib
from data.prepare.documents import (SPLITS, digest, expand, is_validation, read_documents, sample_texts,
                                    split_pieces, walk)
from data.prepare.manifest import SplitTotals, text_manifest
from data.prepare.output import check_output, staged
from data.records import DataError, ShardWriter, write_manifest


# --- worker processes --------------------------------------------------------------------

_TOKENIZER = None


def _init_tokenizer(files: dict[str, bytes]):
    global _TOKENIZER
    _TOKENIZER = tokenizer_lib.from_files(files, "the tokenizer")


def _encode_file(path: str) -> list[tuple[bytes, np.ndarray]]:
    docs = list(read_documents(epath.Path(path)))
    return [(digest(d.encode()), np.asarray(ids, np.int32)) for d, ids in zip(docs, _TOKENIZER.encode(docs))]


def _check_image(path: str) -> tuple[bytes, bytes]:
    content = epath.Path(path).read_bytes()
    try:
        images.decode(content)
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{path} is not a readable PNG/JPEG image; remove it from --input") from None
    return digest(content), content


def _map(fn, items: list[str], workers: int, init=None, init_args=()):
    """fn over items in order, in `workers` spawned processes (spawn: safe after JAX started threads)."""
    if workers <= 1:
        if init:
            init(*init_args)
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=init_args) as pool:
        yield from pool.map(fn, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


# --- text --------------------------------------------------------------------------------


def prepare_text(
    inputs: list[str],
    out: str,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    seq_len: int = 2048,
    val_fraction: float = 0.01,
    workers: int = 0,
    shard_mb: float = 256,
    tokenizer_sample_mb: int = 256,
    overwrite: bool = False,
) -> dict:
    """Tokenise `inputs` into ArrayRecord shards under `out`; returns the manifest."""
    files, out, tok = text_inputs(inputs, out, tokenizer=tokenizer, vocab_size=vocab_size, model_type=model_type,
                                  seq_len=seq_len, val_fraction=val_fraction, sample_mb=tokenizer_sample_mb,
                                  overwrite=overwrite)
    workers = workers or os.cpu_count() or 1
    with staged(out, overwrite) as stage:
        tok.write(stage)
        shards = _TextShards(stage, tok, seq_len, val_fraction, shard_mb)
        for docs in _map(_encode_file, [str(f) for f in files], min(workers, len(files)), _init_tokenizer, (tok.files,)):
            for key, ids in docs:
                shards.add(key, ids)
        if not shards.seen:
            raise DataError(f"the inputs {', '.join(inputs)} hold no text; check --input")
        manifest = shards.manifest(input_files=len(files))
        write_manifest(stage, manifest)
    return manifest


def text_inputs(inputs: list[str], out: str, *, tokenizer: str | None, vocab_size: int, model_type: str, seq_len: int,
                val_fraction: float, sample_mb: int, overwrite: bool):
    """What every driver settles before any work: the input files, an output it may write, and the
    tokenizer (the one given, else one trained on a sample of the training documents)."""
    files = expand(inputs)
    out = epath.Path(out)
    check_output(out, overwrite)
    if seq_len < 1:
        raise DataError(f"--seq-len {seq_len} must be positive")
    if tokenizer:
        return files, out, tokenizer_lib.load(tokenizer)
    texts = sample_texts(files, sample_mb << 20, val_fraction)
    if not texts:
        raise DataError(f"the inputs {', '.join(inputs)} hold no text to train a tokenizer on; check --input")
    return files, out, tokenizer_lib.train(texts, vocab_size, model_type)


class _TextShards:
    """The documents of a text dataset as they arrive, deduplicated (the first of each kept) and
    written into the shards of their split, with the totals the manifest keeps."""

    def __init__(self, stage: epath.Path, tok, seq_len: int, val_fraction: float, shard_mb: float):
        self.tok, self.seq_len, self.val_fraction = tok, seq_len, val_fraction
        self.writers = {s: ShardWriter(stage, s, int(shard_mb * 2**20)) for s in SPLITS}
        self.totals = {s: SplitTotals(tok.vocab_size) for s in SPLITS}
        self.seen, self.duplicates = set(), 0

    def add(self, key: bytes, ids: np.ndarray):
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        split = "validation" if is_validation(key, self.val_fraction) else "train"
        pieces = split_pieces(ids, self.seq_len, self.tok.bos_id, self.tok.eos_id)
        for piece in pieces:
            self.writers[split].write(piece.tobytes())
        self.totals[split].add(ids, pieces)

    def manifest(self, input_files: int) -> dict:
        """Closes the shards."""
        shards = {s: self.writers[s].close() for s in SPLITS}
        return text_manifest(self.tok, self.seq_len, input_files, self.duplicates, self.totals, shards)


# --- images ------------------------------------------------------------------------------


def prepare_images(
    inputs: list[str], out: str, *, val_fraction: float = 0.01, workers: int = 0, shard_mb: float = 256, overwrite: bool = False
) -> dict:
    """Encoded images (and labels from class subdirectories) into ArrayRecord shards under `out`."""
    files = [f for f in expand(inputs) if f.suffix.lower() in images.SUFFIXES]
    if not files:
        raise DataError(f"the inputs {', '.join(inputs)} hold no PNG or JPEG files; check --input")
    out = epath.Path(out)
    classes, labels = images.labels_from_directories(files)
    workers = workers or os.cpu_count() or 1
    with staged(out, overwrite) as stage:
        writers = {s: ShardWriter(stage, s, int(shard_mb * 2**20)) for s in SPLITS}
        stats = {s: {"records": 0} for s in SPLITS}
        seen, duplicates = set(), 0
        for label, (key, content) in zip(labels, _map(_check_image, [str(f) for f in files], min(workers, len(files)))):
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            split = "validation" if is_validation(key, val_fraction) else "train"
            writers[split].write(images.encode_record(label, content))
            stats[split]["records"] += 1
        manifest = {
            "kind": "images",
            "classes": classes,
            "input_files": len(files),
            "duplicate_images": duplicates,
            "splits": {s: {"shards": writers[s].close(), **stats[s]} for s in SPLITS},
        }
        write_manifest(stage, manifest)
    return manifest


def image_directory(directory: str, val_fraction: float) -> tuple[list[str], dict]:
    """(class names, {"train": source or None, "validation": ...}) to train straight from a directory
    of PNG/JPEG files, split by a hash of each file's path below the directory."""
    root = epath.Path(directory)
    files = sorted(f for f in walk(root) if f.suffix.lower() in images.SUFFIXES)
    if not files:
        raise DataError(f"data.source={directory} holds no PNG or JPEG images; point it at a directory of images "
                        "(one subdirectory per class for labels) or a dataset from `pretrain prepare images`")
    classes, labels = images.labels_from_directories(files)
    splits = {s: ([], []) for s in SPLITS}
    for f, label in zip(files, labels):
        split = "validation" if is_validation(digest(str(f.relative_to(root)).encode()), val_fraction) else "train"
        splits[split][0].append(f)
        splits[split][1].append(label)
    return classes, {s: images.FileSource(f, l) if f else None for s, (f, l) in splits.items()}
