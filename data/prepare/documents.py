"""Pure per-document functions of corpus preparation, the same on every driver: which files the
inputs name, the documents in a file, a document's digest (its deduplication key) and split, its
pieces, and the unigram entropy a manifest records."""

import hashlib
import io
import json

import numpy as np
from etils import epath

from data.records import DataError

SPLITS = ("train", "validation")
GLOB_CHARS = "*?["


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
            found = sorted(walk(path)) if path.is_dir() else [path]
        else:
            base = epath.Path("/".join(parts[:first_glob]) or ".")
            found = sorted(p for p in base.glob("/".join(parts[first_glob:])) if p.is_file()) if base.exists() else []
        if not found:
            raise DataError(f"input {pattern} matches no files; check --input")
        files += found
    return files


def walk(directory: epath.Path):
    for p in directory.iterdir():  # epath has no rglob on gs://
        if p.is_dir():
            yield from walk(p)
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


def split_pieces(ids: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """BOS + ids + EOS cut into pieces of at most seq_len + 1 tokens, overlapping by one, so that
    every token is predicted exactly once: a piece gives inputs piece[:-1], targets piece[1:]."""
    doc = np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int32)
    return [doc[start : start + seq_len + 1] for start in range(0, len(doc) - 1, seq_len)]


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy of the token distribution: the loss of a model that ignores context."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())
