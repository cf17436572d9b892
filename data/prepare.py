"""Raw files -> ArrayRecord shards + manifest: `pretrain prepare text` and `pretrain prepare images`.

Text: every input file holds documents (a plain text file is one document, JSONL and
Parquet one per row's `text`). The tokenizer is the one given (SentencePiece or a Hugging Face
tokenizer.json, data/tokenizer.py), else a SentencePiece model trained on the training documents;
its files go into the output. Worker processes tokenise whole files; the main process
drops duplicate documents, assigns each to train or validation by a hash of its content
(the same split on every machine), cuts it into pieces of at most seq_len + 1 tokens
(BOS + ids + EOS; a long document is split, never dropped, and counted in the manifest)
and writes one int32 record per piece.

Images: every PNG/JPEG becomes one record (its label and its encoded bytes, not
re-encoded); images under class subdirectories get labels by sorted directory name.

Output is built in a staging directory and only moved into place (or uploaded, for
gs://, with the manifest last) once complete, so a crash never leaves a half dataset
that looks whole, and an existing dataset is replaced only with overwrite=True.
"""

import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile

import numpy as np
from etils import epath

from data import images
from data import tokenizer as tokenizer_lib
from data.records import MANIFEST, DataError, ShardWriter, write_manifest

SPLITS = ("train", "validation")
GLOB_CHARS = "*?["


# --- inputs -----------------------------------------------------------------------------


def expand(patterns: list[str]) -> list[epath.Path]:
    """Files named by paths, directories (recursively) or globs (`*` per level, no `**`), local or gs://."""
    files = []
    for pattern in patterns:
        parts = str(pattern).split("/")
        first_glob = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
        if first_glob is None:
            path = epath.Path(pattern)
            if not path.exists():
                raise DataError(f"input {pattern} does not exist; check --input")
            found = sorted(_walk(path)) if path.is_dir() else [path]
        else:
            base = epath.Path("/".join(parts[:first_glob]) or ".")
            found = sorted(p for p in base.glob("/".join(parts[first_glob:])) if p.is_file()) if base.exists() else []
        if not found:
            raise DataError(f"input {pattern} matches no files; check --input")
        files += found
    return files


def _walk(directory: epath.Path):
    for p in directory.iterdir():  # epath has no rglob on gs://
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def read_documents(path: epath.Path):
    """The non-blank documents of one file: JSONL/Parquet rows' `text`, or the whole file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{n} is not a JSON object with a 'text' field") from None
                if isinstance(text, str) and text.strip():
                    yield text
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(path.read_bytes()), columns=["text"])
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(f"{path} is not a Parquet file with a 'text' column ({e})") from None
        yield from (t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip())
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; remove it from --input or convert it") from None
        if text.strip():
            yield text


def digest(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()[:16]


def is_validation(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def sample_texts(files, max_bytes: int, val_fraction: float) -> list[str]:
    """Training documents to learn a tokenizer from (validation documents stay unseen)."""
    texts, total = [], 0
    for path in files:
        for text in read_documents(path):
            if not is_validation(digest(text.encode()), val_fraction):
                texts.append(text)
                total += len(text)
            if total >= max_bytes:
                return texts
    return texts


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


# --- output ------------------------------------------------------------------------------


def check_output(out: epath.Path, overwrite: bool):
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output directory {out} is not empty; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def staged(out: epath.Path, overwrite: bool, last: str = MANIFEST):
    """A local directory to build an output in; moved or uploaded to `out` only on success, the
    file `last` uploaded last so that its presence marks a complete directory."""
    check_output(out, overwrite)
    remote = str(out).startswith("gs://")
    if remote:
        stage = epath.Path(tempfile.mkdtemp(prefix="pretrain-prepare-"))
    else:
        stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
        stage.mkdir(parents=True, exist_ok=True)
    try:
        yield stage
        if out.exists():
            out.rmtree()
        if remote:
            out.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in stage.iterdir())
            for name in sorted(names, key=lambda n: n == last):
                (stage / name).copy(out / name)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


# --- text --------------------------------------------------------------------------------


def split_pieces(ids: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """BOS + ids + EOS cut into pieces of at most seq_len + 1 tokens, overlapping by one, so that
    every token is predicted exactly once: a piece gives inputs piece[:-1], targets piece[1:]."""
    doc = np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int32)
    return [doc[start : start + seq_len + 1] for start in range(0, len(doc) - 1, seq_len)]


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
    shard_mb: int = 256,
    tokenizer_sample_mb: int = 256,
    overwrite: bool = False,
) -> dict:
    """Tokenise `inputs` into ArrayRecord shards under `out`; returns the manifest."""
    files = expand(inputs)
    out = epath.Path(out)
    check_output(out, overwrite)
    if seq_len < 1:
        raise DataError(f"--seq-len {seq_len} must be positive")
    if tokenizer:
        tok = tokenizer_lib.load(tokenizer)
    else:
        texts = sample_texts(files, tokenizer_sample_mb << 20, val_fraction)
        if not texts:
            raise DataError(f"the inputs {', '.join(inputs)} hold no text to train a tokenizer on; check --input")
        tok = tokenizer_lib.train(texts, vocab_size, model_type)
    bos, eos = tok.bos_id, tok.eos_id
    workers = workers or os.cpu_count() or 1
    with staged(out, overwrite) as stage:
        tok.write(stage)
        writers = {s: ShardWriter(stage, s, shard_mb << 20) for s in SPLITS}
        stats = {s: {"documents": 0, "records": 0, "tokens": 0, "split_documents": 0} for s in SPLITS}
        checksums = {s: hashlib.sha256() for s in SPLITS}
        counts = {s: np.zeros(tok.vocab_size, np.int64) for s in SPLITS}
        seen, duplicates = set(), 0
        for docs in _map(_encode_file, [str(f) for f in files], min(workers, len(files)), _init_tokenizer, (tok.files,)):
            for digest, ids in docs:
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                split = "validation" if is_validation(digest, val_fraction) else "train"
                pieces = split_pieces(ids, seq_len, bos, eos)
                for piece in pieces:
                    writers[split].write(piece.tobytes())
                    checksums[split].update(piece.tobytes())
                s = stats[split]
                s["documents"] += 1
                s["records"] += len(pieces)
                s["tokens"] += len(ids) + 2
                s["split_documents"] += len(pieces) > 1
                counts[split] += np.bincount(ids, minlength=tok.vocab_size)
        if not seen:
            raise DataError(f"the inputs {', '.join(inputs)} hold no text; check --input")
        manifest = {
            "kind": "text",
            "tokenizer_kind": tok.kind,
            "tokenizer_sha256": tok.sha256(),
            "vocab_size": tok.vocab_size,
            "special_ids": {"pad": tok.pad_id, "bos": bos, "eos": eos, "unk": tok.unk_id},
            "seq_len": seq_len,
            "input_files": len(files),
            "duplicate_documents": duplicates,
            "files": sorted(tok.files),
            "splits": {
                s: {
                    "shards": writers[s].close(),
                    **stats[s],
                    "tokens_sha256": checksums[s].hexdigest(),
                    "unigram_entropy_nats": unigram_entropy(counts[s]),
                }
                for s in SPLITS
            },
        }
        write_manifest(stage, manifest)
    return manifest


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy of the token distribution: the loss of a model that ignores context."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


# --- images ------------------------------------------------------------------------------


def prepare_images(
    inputs: list[str], out: str, *, val_fraction: float = 0.01, workers: int = 0, shard_mb: int = 256, overwrite: bool = False
) -> dict:
    """Encoded images (and labels from class subdirectories) into ArrayRecord shards under `out`."""
    files = [f for f in expand(inputs) if f.suffix.lower() in images.SUFFIXES]
    if not files:
        raise DataError(f"the inputs {', '.join(inputs)} hold no PNG or JPEG files; check --input")
    out = epath.Path(out)
    classes, labels = images.labels_from_directories(files)
    workers = workers or os.cpu_count() or 1
    with staged(out, overwrite) as stage:
        writers = {s: ShardWriter(stage, s, shard_mb << 20) for s in SPLITS}
        stats = {s: {"records": 0} for s in SPLITS}
        seen, duplicates = set(), 0
        for label, (digest, content) in zip(labels, _map(_check_image, [str(f) for f in files], min(workers, len(files)))):
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            split = "validation" if is_validation(digest, val_fraction) else "train"
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
    files = sorted(f for f in _walk(root) if f.suffix.lower() in images.SUFFIXES)
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
